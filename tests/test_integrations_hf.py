"""StableLoRACallback under transformers' Trainer and TRL's SFTTrainer (tiny models, CPU)."""

import math

import pytest
import torch
from helpers import SMOKE, compose_config
from tiny import byte_tokenizer, lora_model, stop_steps, tiny_llama, token_batches

from stablelora import apply_lora, create_optimizer
from stablelora.integrations.hf import StableLoRACallback

#: The smoke run with a shrink strong enough that layers stop within its 6 steps.
SHRINKING = SMOKE + ["optimizer.shrink_ratio=0.2", "optim.lr=1e-2", "trainer.eval_before=false"]
#: lr and shrink ratio at which the tiny LoRA Llama's layers stop at steps 14-20.
LR, SHRINK = 1e-2, 0.05
PROBE_KEYS = ("feat/delta1", "feat/delta2", "feat/delta3", "feat/dY", "lora/norm_A", "lora/norm_B")
SHRINK_KEYS = ("shrink/num_shrinking", "shrink/fraction_shrinking")


class Batches(torch.utils.data.IterableDataset):
    """Ready-made batches, in order (an iterable dataset: the Trainer does not shuffle it)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def first_item(items):
    return items[0]


def training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    return TrainingArguments(**{**options, **overrides})


def batch_trainer(model, optimizer, data, output, callbacks, scheduler=None, **args):
    """A Trainer reading ``data`` one prepared batch per step, with ``optimizer`` (and
    ``scheduler``) and :func:`training_args` in ``output`` (``args`` override them)."""
    from transformers import Trainer

    return Trainer(
        model=model,
        args=training_args(output, **args),
        train_dataset=Batches(data),
        data_collator=first_item,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )


def callback_rows(log_history, keys):
    """{step: row} of the rows holding any of ``keys``."""
    return {row["step"]: row for row in log_history if any(key in row for key in keys)}


def test_trainer_logs_what_run_py_records(tmp_path, monkeypatch, one_thread):
    """Same model, batches, optimizer, schedule and seed as ``train()``: the callback's rows
    equal run.py's records (shrink counts on logging steps, probe means on probe steps)."""

    import stablelora.tasks as tasks
    from stablelora.records.recorder import RunRecorder
    from stablelora.records.rows import read_jsonl
    from stablelora.runner.setup import Distributed, build_run, seed_everything
    from stablelora.runner.train import train

    cfg = compose_config(SHRINKING)
    batches = []  # the batches train() reads, in its order
    build_task = tasks.build_task

    def recording_build_task(*args, **kwargs):
        task = build_task(*args, **kwargs)
        collate = task.collate
        task.collate = lambda indices: batches.append(collate(indices)) or batches[-1]
        return task

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_task", recording_build_task)
        summary = train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(batches) == cfg.trainer.max_steps
    assert 0 < summary["shrink_layers"]["stopped"] < summary["shrink_layers"]["layers"]

    seed_everything(cfg.seed, cfg.trainer.deterministic)
    recorder = RunRecorder(tmp_path / "unused", {}, cfg.logger, "unused", enabled=False)
    run = build_run(cfg, Distributed("cpu"), recorder)
    callback = StableLoRACallback(
        probe_every=cfg.probe.every, probe_first_steps=cfg.probe.first_steps
    )
    trainer = batch_trainer(run.model, run.optimizer, batches, tmp_path, [callback],
                            run.scheduler, max_steps=cfg.trainer.max_steps,
                            logging_steps=cfg.trainer.log_every)  # fmt: skip
    trainer.train()

    logged = callback_rows(trainer.state.log_history, PROBE_KEYS + SHRINK_KEYS)
    probe_steps = {r["step"] for r in records if "feat/delta1" in r}
    shrink_steps = {r["step"] for r in records if "shrink/num_shrinking" in r}
    assert probe_steps == {1, 2, 3, 6} and shrink_steps == {2, 4, 6}
    assert set(logged) == probe_steps | shrink_steps
    for record in records:
        row = logged.get(record["step"], {})
        for key in PROBE_KEYS + SHRINK_KEYS:
            if key in record:
                assert row[key] == pytest.approx(record[key], rel=1e-4, abs=1e-9), (key, record)
    # the trainer's own rows (loss, lr) are still logged on every logging step
    losses = callback_rows(trainer.state.log_history, ("loss",))
    assert sorted(losses) == sorted(shrink_steps)
    assert not set(PROBE_KEYS) & {key for row in losses.values() for key in row}
    last = logged[cfg.trainer.max_steps]
    assert last["shrink/num_shrinking"] == summary["shrink_layers"]["shrinking"]
    assert last["shrink/median_stop_step"] == summary["shrink_layers"]["median_stop_step"]
    assert (
        sum(row.get("shrink/newly_stopped", 0) for row in logged.values())
        == (summary["shrink_layers"]["stopped"])
    )
    assert run.optimizer.shrink_state() == {
        name: {"shrinking": entry["shrinking"], "stop_step": entry["stop_step"]}
        for name, entry in summary["shrink"].items()
    }
    assert callback.probe is None  # closed at the end of training: its hooks are gone


def test_logging_every_step_counts_each_layer_stop_at_its_step(tmp_path, one_thread):

    model = lora_model(dtype=torch.float32)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    steps = 30
    data = [{"input_ids": ids, "labels": ids} for ids in token_batches(steps)]
    trainer = batch_trainer(model, optimizer, data, tmp_path, [StableLoRACallback()],
                            max_steps=steps, lr_scheduler_type="constant")  # fmt: skip
    trainer.train()
    rows = callback_rows(trainer.state.log_history, SHRINK_KEYS)
    assert sorted(rows) == list(range(1, steps + 1))
    stops = [step for step in stop_steps(optimizer).values() if step is not None]
    assert stops, "no layer stopped: the test needs a stronger shrink"
    for step, row in rows.items():
        assert row["shrink/newly_stopped"] == stops.count(step)
        assert row["shrink/num_shrinking"] == len(stop_steps(optimizer)) - sum(
            stop <= step for stop in stops
        )
    assert not any(key.startswith("feat/") for row in rows.values() for key in row)


def test_resume_from_a_trainer_checkpoint_keeps_the_shrink_state(tmp_path, one_thread):
    """Trainer checkpoints hold the optimizer's state_dict: a run resumed from one ends with
    the same flags, stop steps and adapter as the run that was never stopped."""

    steps, stop_at = 30, 17
    data = [{"input_ids": ids, "labels": ids} for ids in token_batches(steps)]

    def fit(output, max_steps, resume=None, **args):
        model = lora_model(dtype=torch.float32)
        optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
        trainer = batch_trainer(model, optimizer, data, output, [StableLoRACallback()],
                                max_steps=max_steps, lr_scheduler_type="constant", **args)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model, optimizer, trainer

    model, whole, _ = fit(tmp_path / "whole", steps)
    fit(tmp_path / "cut", stop_at, save_strategy="steps", save_steps=stop_at)
    checkpoint = tmp_path / "cut" / "trainer" / f"checkpoint-{stop_at}"
    assert (checkpoint / "optimizer.pt").exists()
    # the cut run read the first 17 batches; the resumed one skips them and reads the rest
    resumed_model, resumed, trainer = fit(tmp_path / "cut", steps, resume=str(checkpoint))

    stopped_before = [s for s in stop_steps(whole).values() if s is not None and s <= stop_at]
    stopped_after = [s for s in stop_steps(whole).values() if s is not None and s > stop_at]
    assert stopped_before and stopped_after, "the test needs stops on both sides of the cut"
    assert stop_steps(resumed) == stop_steps(whole)
    assert resumed.shrink_step == whole.shrink_step == steps
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)
    # log_history holds the checkpoint's rows (1..17) and the resumed run's (18..30)
    rows = callback_rows(trainer.state.log_history, SHRINK_KEYS)
    assert sorted(rows) == list(range(1, steps + 1))
    after = [row["shrink/newly_stopped"] for step, row in rows.items() if step > stop_at]
    assert sum(after) == len(stopped_after)
    assert sum(row["shrink/newly_stopped"] for row in rows.values()) == len(stop_steps(whole))


@pytest.mark.parametrize("skipped_steps", [0, 3])
def test_resume_from_a_lora_checkpoint_is_refused_unless_the_shrink_restarts(
    tmp_path, one_thread, skipped_steps
):
    """A Trainer checkpoint of LoRA (plain AdamW) at step 15, resumed with Stable-LoRA: a
    ValueError, or with missing_shrink_state='restart' a shrink that starts at step 15 of the
    Trainer (not at the optimizer's step 0), logged, with stop steps on the Trainer's clock.
    ``skipped_steps``: the checkpoint's AdamW counted fewer steps than the Trainer did, as
    after steps a GradScaler skipped; the restart still follows the Trainer's step."""

    steps, cut = 30, 15
    data = [{"input_ids": ids, "labels": ids} for ids in token_batches(steps)]

    def trainer_for(output, method, max_steps, **args):
        model = lora_model(dtype=torch.float32)
        optimizer = create_optimizer(model, method, lr=LR, **args.pop("options", {}))
        callbacks = [StableLoRACallback()] if method == "stable_lora" else []
        trainer = batch_trainer(model, optimizer, data, output, callbacks, max_steps=max_steps,
                                lr_scheduler_type="constant", **args)  # fmt: skip
        return trainer, optimizer

    lora, _ = trainer_for(tmp_path, "lora", cut, save_strategy="steps", save_steps=cut)
    lora.train()
    checkpoint = tmp_path / "trainer" / f"checkpoint-{cut}"
    if skipped_steps:
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        for entry in state["state"].values():
            entry["step"] -= skipped_steps
        torch.save(state, checkpoint / "optimizer.pt")

    options = dict(shrink_ratio=SHRINK)
    refused, _ = trainer_for(tmp_path, "stable_lora", steps, options=options)
    with pytest.raises(ValueError, match="written by another optimizer") as error:
        refused.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(error.value)

    trainer, optimizer = trainer_for(tmp_path, "stable_lora", steps, options=options)
    optimizer.missing_shrink_state = "restart"
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == steps
    assert optimizer.shrink_restart_step == cut and optimizer.shrink_step == steps
    assert optimizer.record_summary()["shrink_restart_step"] == cut
    restarts = [row for row in trainer.state.log_history if "shrink/restart_step" in row]
    assert restarts == [{"shrink/restart_step": cut, "step": cut, "epoch": restarts[0]["epoch"]}]
    stops = [step for step in stop_steps(optimizer).values() if step is not None]
    assert stops and min(stops) > cut  # the Trainer's steps 16..30, not the optimizer's 1..15
    rows = callback_rows(trainer.state.log_history, SHRINK_KEYS)
    assert sorted(rows) == list(range(cut + 1, steps + 1))
    for step, row in rows.items():
        assert row["shrink/newly_stopped"] == stops.count(step)
        if "shrink/median_stop_step" in row:
            assert cut < row["shrink/median_stop_step"] <= step


def test_sft_trainer_logs_the_shrink_and_the_probe(tmp_path, one_thread):
    """TRL's SFTTrainer: the rows reach log_history (the report_to path), and the probe's
    values equal a FeatureProbe run on the same inputs with a twin model and optimizer."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stablelora.optim import find_lora_pairs
    from stablelora.probes.gamma import FeatureProbe

    tokenizer = byte_tokenizer()
    texts = [f"topic {i % 3}: the quick brown fox {i} jumps" for i in range(24)]

    def build():
        base = tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1)
        model = apply_lora(base, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
        return model, create_optimizer(model, "stable_lora", lr=1e-2, shrink_ratio=0.3)

    model, optimizer = build()
    inputs = []  # what SFTTrainer fed the model, step by step
    model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        ),
        with_kwargs=True,
    )
    steps = 6
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
        max_length=48,
        bf16=False,  # TRL defaults to bf16 autocast; the replay below is float32
        activation_checkpointing=False,
        lr_scheduler_type="constant",
        seed=0,
    )
    callback = StableLoRACallback(probe_every=2)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[callback],
    )
    trainer.train()
    rows = callback_rows(trainer.state.log_history, PROBE_KEYS + SHRINK_KEYS)
    assert sorted(rows) == [2, 4, 6]
    # TRL's own rows (loss, its averaged metrics) are still logged, and apart from ours
    trl_rows = callback_rows(trainer.state.log_history, ("loss",))
    assert sorted(trl_rows) == [2, 4, 6]
    assert all("mean_token_accuracy" in row and "feat/dY" not in row for row in trl_rows.values())
    assert len(inputs) == steps

    # The same steps by hand, on the inputs SFTTrainer used.
    twin, twin_optimizer = build()
    probe = FeatureProbe(twin, find_lora_pairs(twin), first_steps=0, every=2, per_layer=False)
    expected = {}
    for step, batch in enumerate(inputs, start=1):
        probe.arm(step)
        outputs = twin(**batch)
        loss = outputs.loss
        if loss is None:  # TRL's fused LM head returns the log-probabilities, not the loss
            loss = -outputs.log_probs.sum() / outputs.label_mask.sum()
        loss.backward()
        probe.before_update()
        twin_optimizer.step()
        twin_optimizer.zero_grad()
        expected[step] = probe.after_update(twin_optimizer)
    probe.close()
    for step, row in rows.items():
        for key in PROBE_KEYS:
            assert row[key] == pytest.approx(expected[step][key], rel=1e-4), (step, key)
        assert math.isfinite(row["feat/delta2"])
    assert stop_steps(twin_optimizer) == stop_steps(optimizer)
    assert rows[steps]["shrink/num_shrinking"] == sum(
        entry["shrinking"] for entry in optimizer.shrink_state().values()
    )


def test_an_optimizer_without_a_shrink_and_no_probe_is_a_clear_error(tmp_path):

    model = lora_model(dtype=torch.float32)
    data = [{"input_ids": ids, "labels": ids} for ids in token_batches(2)]
    optimizer = create_optimizer(model, "lora", lr=LR)
    trainer = batch_trainer(model, optimizer, data, tmp_path, [StableLoRACallback()], max_steps=2)
    with pytest.raises(ValueError, match="not Stable-LoRA, and probe_every=0"):
        trainer.train()
