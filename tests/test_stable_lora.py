"""The Stable-LoRA optimizer against a straightforward reference of the paper's Algorithm 1."""

from __future__ import annotations

import io
import math

import pytest
import torch
from tiny import (
    LR,
    SHRINK,
    TARGETS,
    lora_model,
    stop_steps,
    tiny_llama,
    token_batches,
    train_steps,
)

from stablelora import StableLoRA, apply_lora, create_optimizer, find_lora_pairs

WEIGHT_DECAY = 0.01
BETAS, EPS = (0.9, 0.999), 1e-8


class ReferenceStableLoRA:
    """Algorithm 1 written the obvious way: a Python loop over layers, then AdamW by hand."""

    def __init__(self, model, stop_rule="norm"):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layers = [(pair.name, pair.A, pair.B) for pair in find_lora_pairs(model)]
        self.shrinking = {name: True for name, _, _ in self.layers}
        self.stop_step = {name: None for name, _, _ in self.layers}
        self.stop_rule = stop_rule
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in self.params}
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for name, A, B in self.layers:
            if not self.shrinking[name]:
                continue
            if self.stop_rule == "norm":
                stop = A.norm() < (A.numel() / B.numel()) * B.norm()
            elif self.stop_rule == "never":
                stop = False
            else:
                stop = self.t > int(self.stop_rule.split(":")[1])
            if stop:
                self.shrinking[name], self.stop_step[name] = False, self.t
            else:
                A.mul_(1 - SHRINK)
        for p in self.params:
            exp_avg, exp_avg_sq = self.moments[id(p)]
            p.mul_(1 - LR * WEIGHT_DECAY)
            exp_avg.mul_(BETAS[0]).add_((1 - BETAS[0]) * p.grad)
            exp_avg_sq.mul_(BETAS[1]).add_((1 - BETAS[1]) * p.grad**2)
            m_hat = exp_avg / (1 - BETAS[0] ** self.t)
            v_hat = exp_avg_sq / (1 - BETAS[1] ** self.t)
            p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))


@pytest.fixture(scope="module")
def reference_run():
    """``reference_run(stop_rule)``: the reference model and optimizer after 300 steps, trained
    once per stop rule (the same target for the three implementations; tests only read them)."""
    runs = {}

    def run(stop_rule):
        if stop_rule not in runs:
            model = lora_model()
            reference = ReferenceStableLoRA(model, stop_rule)
            train_steps(model, reference, token_batches(300))
            runs[stop_rule] = model, reference
        return runs[stop_rule]

    return run


@pytest.mark.parametrize("stop_rule", ["norm", "never", "steps:40"])
@pytest.mark.parametrize("implementation", ["foreach", "fused", "single_tensor"])
def test_matches_reference_algorithm_over_300_steps(
    stop_rule, implementation, one_thread, reference_run
):
    ours = lora_model()
    flags = {
        "foreach": dict(foreach=True),
        "fused": dict(fused=True),
        "single_tensor": dict(foreach=False),
    }[implementation]
    optimizer = create_optimizer(
        ours,
        "stable_lora",
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        betas=BETAS,
        eps=EPS,
        shrink_ratio=SHRINK,
        stop_rule=stop_rule,
        **flags,
    )
    train_steps(ours, optimizer, token_batches(300))
    reference_model, reference = reference_run(stop_rule)

    for (name, p), q in zip(ours.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=name)
    assert stop_steps(optimizer) == reference.stop_step
    if stop_rule == "norm":
        # The test is only meaningful if layers stop at different times within the run.
        assert all(step is not None for step in reference.stop_step.values())
        assert len(set(reference.stop_step.values())) > 2
    elif stop_rule == "never":
        assert all(step is None for step in reference.stop_step.values())
    else:
        assert set(reference.stop_step.values()) == {41}


def test_first_step_shrinks_every_layer_and_leaves_moments_alone():
    model = lora_model()
    pairs = find_lora_pairs(model)
    before = [pair.A.detach().clone() for pair in pairs]
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    optimizer.shrink_()  # B0 = 0: no layer can pass the stop test on step 1
    for pair, A0 in zip(pairs, before):
        torch.testing.assert_close(pair.A, A0 * (1 - SHRINK), rtol=0, atol=0)
    assert all(state["shrinking"] for state in optimizer.shrink_state().values())
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters() if p.requires_grad)


def test_equal_norms_do_not_stop_the_shrink():
    # The stop test is strict: at init_scale=0, ||A|| = ||B|| = 0 and every layer shrinks on.
    model = lora_model(init_scale=0.0)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    for _ in range(3):
        optimizer.shrink_()
    assert all(
        state == {"shrinking": True, "stop_step": None}
        for state in optimizer.shrink_state().values()
    )


def test_resume_mid_shrink_is_bit_identical():
    batches = token_batches(160)
    uninterrupted = lora_model(dtype=torch.float32)
    optimizer = create_optimizer(uninterrupted, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    train_steps(uninterrupted, optimizer, batches)

    first = lora_model(dtype=torch.float32)
    optimizer = create_optimizer(first, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    train_steps(first, optimizer, batches[:80])
    shrinking = [s["shrinking"] for s in optimizer.shrink_state().values()]
    assert any(shrinking) and not all(shrinking), "resume point must be mid-shrink"
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = lora_model(dtype=torch.float32, seed=123)  # different init: all state comes from disk
    resumed.load_state_dict(checkpoint["model"])
    optimizer = create_optimizer(resumed, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, optimizer, batches[80:])
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_other_layers_is_rejected():
    optimizer = create_optimizer(lora_model(), "stable_lora")
    other = create_optimizer(lora_model(target_modules=["q_proj"]), "stable_lora")
    with pytest.raises(ValueError, match="same model, target_modules"):
        other.load_state_dict(optimizer.state_dict())


def lora_checkpoint(steps):
    """The model and LoRA's (plain AdamW) optimizer state after ``steps`` steps."""
    model = lora_model()
    optimizer = create_optimizer(model, "lora", lr=LR)
    train_steps(model, optimizer, token_batches(steps))
    return model, optimizer.state_dict()


def test_checkpoint_of_another_optimizer_is_refused():
    model, state = lora_checkpoint(10)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    with pytest.raises(ValueError, match="written by another optimizer") as error:
        optimizer.load_state_dict(state)
    assert "\n" not in str(error.value) and "missing_shrink_state = 'restart'" in str(error.value)
    assert not optimizer.state and optimizer.shrink_step == 0  # nothing of it was loaded
    with pytest.raises(ValueError, match="must be 'error' or 'restart'"):
        optimizer.missing_shrink_state = "fresh"


@pytest.mark.parametrize("stop_rule", ["norm", "steps:5"])
def test_restart_starts_the_shrink_fresh_at_the_checkpoints_step(stop_rule):
    """A LoRA checkpoint at step 10 resumed with missing_shrink_state='restart': AdamW's
    moments are LoRA's, every layer shrinks again from step 11, stop steps count on from 10
    (steps:5 shrinks on steps 11..15), and the restart is in the summary and the state dict."""
    shrink = 0.1  # layers stop within 30 steps of the restart
    model, state = lora_checkpoint(10)
    optimizer = create_optimizer(
        model, "stable_lora", lr=LR, shrink_ratio=shrink, stop_rule=stop_rule
    )
    optimizer.missing_shrink_state = "restart"
    optimizer.load_state_dict(state)
    assert optimizer.shrink_step == optimizer.shrink_restart_step == 10
    first = next(p for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(optimizer.state[first]["exp_avg"], state["state"][0]["exp_avg"])
    A = find_lora_pairs(model)[0].A
    before = A.detach().clone()
    optimizer.shrink_()  # step 11's shrink
    torch.testing.assert_close(A, before * (1 - shrink), rtol=0, atol=0)  # it shrinks again

    train_steps(model, optimizer, token_batches(30, seed=2)[1:])
    stops = set(stop_steps(optimizer).values())
    assert None not in stops and min(stops) > 10
    if stop_rule == "steps:5":
        assert stops == {16}
    summary = optimizer.record_summary()
    assert summary["shrink_restart_step"] == 10
    assert summary["shrink_layers"]["median_stop_step"] > 10

    resumed = create_optimizer(lora_model(), "stable_lora", lr=LR, stop_rule=stop_rule)
    resumed.load_state_dict(optimizer.state_dict())  # its own checkpoint: no option needed
    assert resumed.shrink_restart_step == 10 and resumed.shrink_step == 40
    assert stop_steps(resumed) == stop_steps(optimizer)
    assert "shrink_restart_step" not in create_optimizer(model, "stable_lora").record_summary()


def test_pairs_follow_modules_not_parameter_order():
    model = lora_model()
    pairs = find_lora_pairs(model)
    assert len(pairs) == 2 * len(TARGETS)
    for pair in pairs:
        module = model.get_submodule("base_model.model." + pair.name)
        assert pair.A is module.lora_A["default"].weight
        assert pair.B is module.lora_B["default"].weight
    # Reversing the parameter list must not change the pairing or the result.
    forward, backward = lora_model(), lora_model()
    params = [p for p in backward.parameters() if p.requires_grad][::-1]
    optimizer_b = StableLoRA(params, find_lora_pairs(backward), lr=LR, shrink_ratio=SHRINK)
    optimizer_f = create_optimizer(forward, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    batches = token_batches(20)
    train_steps(forward, optimizer_f, batches)
    train_steps(backward, optimizer_b, batches)
    for p, q in zip(forward.parameters(), backward.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["lora", "rslora", "loraplus", "stable_lora"])
def test_every_trainable_parameter_is_optimized(method):
    from tiny import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=3))
    model = apply_lora(base, rank=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    options = {"loraplus_lr_ratio": 4} if method in ("loraplus", "stable_lora") else {}
    optimizer = create_optimizer(model, method, lr=1e-3, **options)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable)
    assert {id(p) for p in model.parameters() if p.requires_grad} <= optimized


def test_loraplus_learning_rates_follow_peft_grouping():
    for method in ("loraplus", "stable_lora"):
        model = lora_model()
        optimizer = create_optimizer(
            model, method, lr=2e-4, loraplus_lr_ratio=16, weight_decay=0.01
        )
        lr_of = {
            id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
        }
        for name, p in model.named_parameters():
            if "lora_A" in name:
                assert lr_of[id(p)] == (2e-4, 0.01), name
            elif "lora_B" in name:
                assert lr_of[id(p)] == pytest.approx((3.2e-3, 0.01)), name
        if method == "stable_lora":
            assert isinstance(optimizer, StableLoRA)


@pytest.mark.parametrize(
    "rank,alpha,lora_scale,rslora_scale",
    [(8, 16, 2.0, 5.656854), (16, 16, 1.0, 4.0), (64, 16, 0.25, 2.0)],
)
def test_rslora_scale_is_alpha_over_sqrt_rank(rank, alpha, lora_scale, rslora_scale):
    for scaling, expected in (("lora", lora_scale), ("rslora", rslora_scale)):
        model = apply_lora(tiny_llama(), rank=rank, alpha=alpha, scaling=scaling)
        scales = [pair.scale for pair in find_lora_pairs(model)]
        assert scales == [pytest.approx(expected, abs=1e-6)] * len(scales)
    assert rslora_scale == pytest.approx(alpha / math.sqrt(rank), abs=1e-6)


def test_init_scale_multiplies_A0_only():
    reference = lora_model(init_scale=1.0)
    scaled = lora_model(init_scale=4.0)
    for ref, pair in zip(find_lora_pairs(reference), find_lora_pairs(scaled)):
        torch.testing.assert_close(pair.A, 4.0 * ref.A, rtol=0, atol=0)
        assert torch.count_nonzero(pair.B) == 0
    with pytest.warns(UserWarning, match="saddle"):
        zero = lora_model(init_scale=0.0)
    assert all(torch.count_nonzero(pair.A) == 0 for pair in find_lora_pairs(zero))


def test_peft_init_schemes_pass_through():
    gaussian = lora_model(init="gaussian", rank=4)
    A = find_lora_pairs(gaussian)[0].A
    assert A.std().item() == pytest.approx(1 / 4, rel=0.3)  # peft's gaussian: std 1/r
    pissa = lora_model(init="pissa", dtype=torch.float32)
    assert torch.count_nonzero(find_lora_pairs(pissa)[0].B) > 0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_shrink_ratio(ratio):
    with pytest.raises(ValueError, match=r"shrink_ratio must be in \[0, 1\)"):
        create_optimizer(lora_model(), "stable_lora", shrink_ratio=ratio)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="Unknown method 'adam'.*choose one of"):
        create_optimizer(lora_model(), "adam")
    with pytest.raises(ValueError, match=r"match no module.*linear layers are \[.*q_proj.*\]"):
        apply_lora(tiny_llama(), target_modules=["query"])
    with pytest.raises(ValueError, match="no trainable LoRA layers.*apply_lora"):
        create_optimizer(tiny_llama(), "stable_lora")
    with pytest.raises(ValueError, match="stop_rule"):
        create_optimizer(lora_model(), "stable_lora", stop_rule="steps:abc")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        apply_lora(tiny_llama(), rank=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        create_optimizer(lora_model(), "lora", lr=0)


def test_works_as_hf_trainer_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    model = lora_model(dtype=torch.float32)
    batches = token_batches(8)
    dataset = [{"input_ids": x[0], "labels": x[0]} for x in batches]
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    Trainer(
        model=model, args=args, train_dataset=dataset, optimizers=(optimizer, scheduler)
    ).train()
    assert optimizer.shrink_step == 4
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def _ddp_worker(rank, world_size, init_file, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    model = lora_model(dtype=torch.float32, seed=0)
    ddp = DistributedDataParallel(model)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    for input_ids in token_batches(80, seed=10 + rank):  # each rank sees different data
        ddp(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    results[rank] = (trainable, stop_steps(optimizer))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_keep_identical_flags_and_parameters(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, tmp_path / "init", results), nprocs=2, join=True)
        (params0, stops0), (params1, stops1) = results[0], results[1]
    assert stops0 == stops1
    assert any(step is not None for step in stops0.values())
    for p, q in zip(params0, params1):
        assert torch.equal(p, q)


def test_step_hooks_run_once_per_step():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # makes torch hook AdamW.step
    model = lora_model()
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    train_steps(model, optimizer, token_batches(2))
    assert calls == ["pre", "post", "pre", "post"]


def test_grad_scaler_overflow_skips_the_shrink_too():
    model = lora_model(dtype=torch.float32)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK, fused=True)
    A = find_lora_pairs(model)[0].A
    before = A.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    input_ids = token_batches(1)[0]
    scaler.scale(model(input_ids=input_ids, labels=input_ids).loss).backward()
    next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("inf"))
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(A, before) and optimizer.shrink_step == 0


def test_shrink_counts_summarise_the_layers():
    from stablelora.optim.stable_lora import shrink_counts

    def layer(stop_step):
        return {"shrinking": stop_step is None, "stop_step": stop_step}

    state = {"a": layer(40), "b": layer(None), "c": layer(10), "d": layer(25), "e": layer(None)}
    assert shrink_counts(state) == {
        "layers": 5,
        "shrinking": 2,
        "stopped": 3,
        "median_stop_step": 25,
    }
    state["f"] = layer(30)  # an even count: the mean of the two middle stop steps
    assert shrink_counts(state)["median_stop_step"] == 27.5
    none = shrink_counts({"a": layer(None)})
    assert none == {"layers": 1, "shrinking": 1, "stopped": 0, "median_stop_step": None}
