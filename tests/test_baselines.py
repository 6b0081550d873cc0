"""Baseline optimizers: Riemannian-preconditioned AdamW, LoRA-RITE, adamw_large_wd.

The worked examples are hand computations of one or two steps of each method (Zhang & Pilanci,
ICML 2024, arXiv 2402.02347, scaled AdamW; Yen et al., ICLR 2025, arXiv 2410.20625, Algorithm 1
for LoRA-RITE) on a shared toy r = 2, n = m = 3, s = 2, with numbers quoted to 6 decimals, so
they are compared to 1e-6. The LoRA-RITE examples run in both layouts (the stacked one is CUDA's
default); tests/test_optimizer_layouts.py compares the layouts at length.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers
from torch import nn

from stablelora import apply_lora, create_optimizer, find_lora_pairs
from stablelora.optim.lora_rite import LoRARITE
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.riemann import RiemannianAdamW, riemannian_gradients

F64 = torch.float64
SCALE = 2.0
A_TOY = torch.tensor([[1.0, 0, 1], [0, 2, 0]], dtype=F64)
B_TOY = torch.tensor([[1.0, 0], [0, 1], [1, 1]], dtype=F64)
G_TOY = torch.tensor([[1.0, 2, -1], [0, 1, 3], [2, -1, 1]], dtype=F64)
M_REPARAM = torch.tensor([[2.0, 1], [0.5, 3]], dtype=F64)


def _tensor(rows):
    return torch.tensor(rows, dtype=F64)


def _toy_pair(A=A_TOY, B=B_TOY):
    A, B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    return A, B, LoRAPair("toy", A, B, SCALE)


def _set_toy_grads(A, B, G=G_TOY):
    """g_A = s B^T G and g_B = s G A^T at the current factors (G = dL/dW held fixed)."""
    A.grad = SCALE * B.detach().T @ G
    B.grad = SCALE * G @ A.detach().T


def _step_deltas(optimizer, A, B, G=G_TOY):
    _set_toy_grads(A, B, G)
    before_A, before_B = A.detach().clone(), B.detach().clone()
    optimizer.step()
    return A.detach() - before_A, B.detach() - before_B


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, _tensor(expected), atol=atol, rtol=0)


# ---------------------------------------------------------------- Riemann, worked example


@pytest.mark.parametrize(
    ("reg", "expected_A", "expected_B"),
    [
        (
            0.0,
            [[2.666667, 1.333333, -2.666667], [0.666667, -0.666667, 5.333333]],
            [[0, 2], [3, 1], [3, -1]],
        ),
        (
            1e-6,
            [[2.666665, 1.333332, -2.666663], [0.666667, -0.666666, 5.333329]],
            [[0, 2], [2.999999, 1], [2.999999, -1]],
        ),
        (1.0, [[1.75, 0.75, -1], [0.75, -0.25, 3]], [[0, 1.6], [2, 0.8], [2, -0.8]]),
    ],
)
@pytest.mark.parametrize("stacked", [False, True])
def test_riemann_preconditioned_gradients_match_table(reg, expected_A, expected_B, stacked):
    A, B, _ = _toy_pair()
    _set_toy_grads(A, B)
    (tilde_A,), (tilde_B,) = riemannian_gradients([A.grad], [B], [B.grad], [A], reg, stacked)
    _close(tilde_A, expected_A)
    _close(tilde_B, expected_B)


def test_riemann_scaled_gd_step():
    A, B, pair = _toy_pair()
    optimizer = RiemannianAdamW([A, B], [pair], scaled_gd=True, reg=0.0, lr=0.1, weight_decay=0)
    _step_deltas(optimizer, A, B)
    _close(A.detach(), [[0.733333, -0.133333, 1.266667], [-0.066667, 2.066667, -0.533333]])
    _close(B.detach(), [[1, -0.2], [-0.3, 0.9], [0.7, 1.1]])


def _scaled_gd_product(A0, B0, reg, lr=0.1, plain=False):
    A, B, pair = _toy_pair(A0, B0)
    if plain:
        optimizer = torch.optim.SGD([A, B], lr=lr)
    else:
        optimizer = RiemannianAdamW([A, B], [pair], scaled_gd=True, reg=reg, lr=lr, weight_decay=0)
    _step_deltas(optimizer, A, B)
    return (B @ A).detach()


def test_riemann_scaled_gd_invariance_with_zero_damping():
    reparam = (torch.linalg.inv(M_REPARAM) @ A_TOY, B_TOY @ M_REPARAM)
    gap = (_scaled_gd_product(A_TOY, B_TOY, 0.0) - _scaled_gd_product(*reparam, 0.0)).abs().max()
    assert gap < 1e-12
    damped = _scaled_gd_product(A_TOY, B_TOY, 1.0) - _scaled_gd_product(*reparam, 1.0)
    plain = _scaled_gd_product(A_TOY, B_TOY, 0, plain=True) - _scaled_gd_product(
        *reparam, 0, plain=True
    )
    # By hand: delta = 1 breaks invariance by about 0.16, plain GD by about 9.4 (max |.|).
    assert damped.abs().max() == pytest.approx(0.16, abs=0.01)
    assert plain.abs().max() == pytest.approx(9.4, abs=0.1)


def test_riemann_adamw_authors_variant_vs_jacobi_step1():
    sign_A = torch.tensor([[1.0, 1, -1], [1, -1, 1]], dtype=F64)  # sign(g~_A)
    # pilancilab AdamWr (Gauss-Seidel B, no bias correction): 3.162278e-3 per coordinate,
    # and entry (0, 0) of B moves although g~_B(0, 0) = 0 under Jacobi.
    A, B, pair = _toy_pair()
    authors = RiemannianAdamW(
        [A, B], [pair], authors_variant=True, reg=1e-6, lr=1e-3, weight_decay=0, eps=1e-8
    )
    delta_A, delta_B = _step_deltas(authors, A, B)
    _close(delta_A, (-3.162278e-3 * sign_A).tolist())
    _close(delta_B, [[-0.003162, -0.003162], [-0.003162, -0.003162], [-0.003162, 0.003162]])
    # The Gauss-Seidel g~_B, from A_1 = A + delta_A.
    _, (tilde_B,) = riemannian_gradients([], [], [SCALE * G_TOY @ A_TOY.T], [A_TOY + delta_A], 1e-6)
    _close(tilde_B, [[0.012619, 1.993720], [3.006323, 1.006324], [2.993704, -0.987396]])

    # Default (Jacobi, bias-corrected AdamW): -1e-3 sign(g~) and B(0, 0) stays put.
    A, B, pair = _toy_pair()
    jacobi = RiemannianAdamW([A, B], [pair], reg=1e-6, lr=1e-3, weight_decay=0, eps=1e-8)
    delta_A, delta_B = _step_deltas(jacobi, A, B)
    _close(delta_A, (-1e-3 * sign_A).tolist())
    _close(delta_B, [[0, -1e-3], [-1e-3, -1e-3], [-1e-3, 1e-3]])
    assert delta_B[0, 0] == 0


def test_peft_riemannian_helper_matches_worked_example_and_ours():
    """peft's create_riemannian_optimizer agrees with the worked example (Jacobi, corrected)."""
    from peft.optimizers import create_riemannian_optimizer

    def layer():
        module = nn.Module()
        module.lora_A = nn.ModuleDict({"default": nn.Linear(3, 2, bias=False, dtype=F64)})
        module.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False, dtype=F64)})
        module.lora_A["default"].weight.data.copy_(A_TOY)
        module.lora_B["default"].weight.data.copy_(B_TOY)
        return module

    model_peft, model_ours = nn.Sequential(layer()), nn.Sequential(layer())
    peft_opt = create_riemannian_optimizer(
        model_peft, torch.optim.AdamW, lr=1e-3, reg=1e-6, weight_decay=0.0
    )
    ours = create_optimizer(model_ours, method="riemann", lr=1e-3, reg=1e-6, weight_decay=0.0)
    deltas = []
    for model, optimizer in [(model_peft, peft_opt), (model_ours, ours)]:
        (pair,) = find_lora_pairs(model)
        deltas.append(_step_deltas(optimizer, pair.A, pair.B))
    _close(deltas[0][1], [[0, -1e-3], [-1e-3, -1e-3], [-1e-3, 1e-3]])
    for peft_delta, our_delta in zip(*deltas):
        torch.testing.assert_close(peft_delta, our_delta, atol=1e-12, rtol=0)


def test_riemann_rejects_conflicting_variants():
    A, B, pair = _toy_pair()
    with pytest.raises(ValueError, match="choose one"):
        RiemannianAdamW([A, B], [pair], authors_variant=True, scaled_gd=True)
    with pytest.raises(ValueError, match="reg"):
        RiemannianAdamW([A, B], [pair], reg=-1.0)


# ---------------------------------------------------------------- LoRA-RITE, worked example

RITE_PLAIN = {  # the worked example's settings: no eps, clip, skip, weight decay
    "lr": 0.01,
    "betas": (0.9, 0.999),
    "rite_eps": 0.0,
    "clip_unmagnified_grad": 0.0,
    "update_skipping": 0.0,
    "weight_decay": 0.0,
}
RITE_DELTA_A1 = [[-0.010917, -0.004896, 0.007540], [-0.001322, 0.001885, -0.013953]]
RITE_DELTA_B1 = [[0, -0.007071], [-0.008660, -0.003536], [-0.008660, 0.003536]]


def _rite(A0=A_TOY, B0=B_TOY, **options):
    A, B, pair = _toy_pair(A0, B0)
    return A, B, LoRARITE([A, B], [pair], **{**RITE_PLAIN, **options})


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_lora_rite_steps_1_and_2(layout):
    A, B, optimizer = _rite(layout=layout)
    delta_A, delta_B = _step_deltas(optimizer, A, B)
    _close(delta_A, RITE_DELTA_A1)
    _close(delta_B, RITE_DELTA_B1)
    # Step 2, G fixed, gradients at (A_1, B_1): exercises the basis transport and beta'.
    delta_A, delta_B = _step_deltas(optimizer, A, B)
    _close(delta_A, [[-0.010916, -0.004909, 0.007502], [-0.001424, 0.001875, -0.013865]])
    _close(delta_B, [[-0.000029, -0.007076], [-0.008738, -0.003538], [-0.008625, 0.003503]])


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_lora_rite_defaults_skip_large_updates_and_keep_small_ones(layout):
    defaults = {"rite_eps": 1e-6, "clip_unmagnified_grad": 1.0, "update_skipping": 1.0}
    defaults["layout"] = layout
    A, B, optimizer = _rite(**defaults)
    delta_A, delta_B = _step_deltas(optimizer, A, B)  # unmagnified RMS about 3.5 > 1
    assert torch.count_nonzero(delta_A) == 0 and torch.count_nonzero(delta_B) == 0
    A, B, optimizer = _rite(**defaults)
    delta_A, delta_B = _step_deltas(optimizer, A, B, 0.01 * G_TOY)  # norm 0.111: untouched
    _close(delta_A, RITE_DELTA_A1)
    _close(delta_B, RITE_DELTA_B1)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_lora_rite_with_zero_B_moves_only_B(layout):
    A, B, optimizer = _rite(B0=torch.zeros_like(B_TOY), layout=layout)
    delta_A, delta_B = _step_deltas(optimizer, A, B)
    assert torch.count_nonzero(delta_A) == 0
    _close(delta_B, RITE_DELTA_B1)


def _regression_product(A0, B0, target, make_optimizer, steps=20):
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    optimizer = make_optimizer(A, B)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * (SCALE * B @ A - target).square().sum()
        loss.backward()
        optimizer.step()
    return (B @ A).detach()


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
@pytest.mark.parametrize("apply_escape", [False, True])
def test_lora_rite_is_invariant_to_reparametrisation(apply_escape, layout):
    # Entries of size 0.3 keep the unmagnified gradients under the default skip threshold, so
    # the factors really move (from a loss of 2.4 to 0.3) with the library defaults.
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return 0.3 * torch.randn(*shape, generator=generator, dtype=F64)

    A0, B0, target = randn(2, 5), randn(6, 2), randn(6, 5)
    reparam = torch.randn(2, 2, generator=generator, dtype=F64) + 2 * torch.eye(2, dtype=F64)
    A1, B1 = torch.linalg.inv(reparam) @ A0, B0 @ reparam

    def rite(A, B):  # library defaults: eps 1e-6, clip and skip at 1
        return LoRARITE(
            [A, B],
            [LoRAPair("x", A, B, SCALE)],
            lr=0.05,
            weight_decay=0,
            apply_escape=apply_escape,
            layout=layout,
        )

    product = _regression_product(A0, B0, target, rite)
    assert (product - B0 @ A0).abs().max() > 0.5
    gap = product - _regression_product(A1, B1, target, rite)
    assert gap.abs().max() < 1e-13

    def adam(A, B):
        return torch.optim.Adam([A, B], lr=0.05)

    adam_gap = _regression_product(A0, B0, target, adam) - _regression_product(A1, B1, target, adam)
    assert adam_gap.abs().max() > 0.1  # the test can tell a non-invariant optimizer


# ---------------------------------------------------------------- on a model


def _tiny_model(seed=0, *, dora=False, head=False, bias=False, random_B=False):
    """1-layer Llama with LoRA on q_proj (B 32 x 4) and v_proj (B 16 x 4)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=bias,
    )
    model = apply_lora(
        transformers.LlamaForCausalLM(config),
        rank=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_dora=dora,
        modules_to_save=["lm_head"] if head else None,
    )
    if bias:  # trainable biases next to the LoRA factors
        for name, param in model.named_parameters():
            if name.endswith("base_layer.bias"):
                param.requires_grad_(True)
    if random_B:  # B0 = 0 would give A no gradient at the first step
        with torch.no_grad():
            for pair in find_lora_pairs(model):
                pair.B.normal_(0, 0.1)
    return model


def _batch(seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 128, (2, 8), generator=generator)


def _backward(model, step):
    ids = _batch(step)
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize(
    ("method", "options"),
    [("riemann", {}), ("riemann", {"authors_variant": True}), ("lora_rite", {})],
)
def test_every_trainable_tensor_updated_and_only_pairs_preconditioned(method, options):
    model = _tiny_model(dora=True, head=True, bias=True, random_B=True)
    pairs = find_lora_pairs(model)
    factor_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) > len(factor_ids) >= 4  # magnitudes, head and biases too
    if method == "lora_rite":
        options = {**options, "update_skipping": 0.0}
    optimizer = create_optimizer(model, method=method, lr=1e-2, weight_decay=0.01, **options)
    _backward(model, 0)

    reference = copy.deepcopy(model)  # torch AdamW on the same gradients
    reference_params = dict(reference.named_parameters())
    for name, param in trainable.items():
        reference_params[name].grad = param.grad.clone()
    torch.optim.AdamW(
        [reference_params[name] for name in trainable], lr=1e-2, weight_decay=0.01
    ).step()
    before = {name: p.detach().clone() for name, p in trainable.items()}
    expected_tilde = {}  # g~ of every factor, by module, from the factors before the step
    for pair in pairs:
        A, B, damping = pair.A.detach(), pair.B.detach(), 1e-6 * torch.eye(4)
        expected_tilde[id(pair.A)] = torch.linalg.solve(B.T @ B + damping, pair.A.grad)
        expected_tilde[id(pair.B)] = torch.linalg.solve(A @ A.T + damping, pair.B.grad.T).T
    optimizer.step()

    for name, param in trainable.items():
        assert not torch.equal(param, before[name]), f"{name} was not updated"
        if id(param) in factor_ids:
            assert not torch.allclose(param, reference_params[name]), f"{name} not preconditioned"
        else:
            assert torch.equal(param, reference_params[name]), f"{name} is not plain AdamW"

    if method == "riemann" and not options:  # the factors' update is AdamW on g~
        for pair in pairs:
            for factor in (pair.A, pair.B):
                start = nn.Parameter(before[_name_of(model, factor)].clone())
                start.grad = expected_tilde[id(factor)]
                torch.optim.AdamW([start], lr=1e-2, weight_decay=0.01).step()
                torch.testing.assert_close(factor.detach(), start.detach())


def _name_of(model, param):
    return next(name for name, p in model.named_parameters() if p is param)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("riemann", {}),
        ("riemann", {"authors_variant": True}),
        ("lora_rite", {}),
        ("lora_rite", {"apply_escape": True, "update_capping": 0.5}),
    ],
)
def test_resume_is_bit_exact(method, options):
    total, saved_at = 6, 3

    def train(model, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            _backward(model, step)
            optimizer.step()

    def build():
        model = _tiny_model(dora=True, head=True)
        return model, create_optimizer(model, method=method, lr=1e-2, **options)

    model, optimizer = build()
    train(model, optimizer, range(total))

    model_a, optimizer_a = build()
    train(model_a, optimizer_a, range(saved_at))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model_b, optimizer_b = build()
    model_b.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    train(model_b, optimizer_b, range(saved_at, total))

    for (name, expected), actual in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(expected, actual), name
    for expected, actual in zip(optimizer.state.values(), optimizer_b.state.values()):
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key


@pytest.mark.parametrize("method", ["riemann", "lora_rite"])
def test_step_hooks_run_once_per_step(method):
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # torch hooks AdamW.step on first use
    model = _tiny_model()
    optimizer = create_optimizer(model, method=method)
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    _backward(model, 0)
    optimizer.step()
    assert len(calls) == 1


def test_lora_rite_state_layout():
    model = _tiny_model()
    optimizer = create_optimizer(model, method="lora_rite")
    _backward(model, 0)
    optimizer.step()
    for pair in find_lora_pairs(model):
        for factor, basis_shape in [(pair.A, (4, 32)), (pair.B, (4, pair.B.shape[0]))]:
            state = optimizer.state[factor]
            assert state["exp_avg"].shape == factor.shape
            assert state["basis"].shape == basis_shape  # orthonormal rows, rank first
            torch.testing.assert_close(state["basis"] @ state["basis"].T, torch.eye(4))
            assert state["second_moment"].shape == (4, 4)
            assert float(state["step"]) == 1.0
    saved = optimizer.state_dict()["lora_rite"]
    assert saved["layer_names"] == [p.name for p in find_lora_pairs(model)]
    assert saved["clip_unmagnified_grad"] == 1.0 and saved["update_skipping"] == 1.0


def test_load_rejects_other_layers():
    optimizer = create_optimizer(_tiny_model(), method="riemann")
    state = optimizer.state_dict()
    state["riemann"]["layer_names"] = ["other"]
    with pytest.raises(ValueError, match="LoRA layers differ"):
        create_optimizer(_tiny_model(), method="riemann").load_state_dict(state)


# ---------------------------------------------------------------- adamw_large_wd


@pytest.mark.parametrize("large_wd_on", ["A", "AB"])
def test_adamw_large_wd_groups(large_wd_on):
    model = _tiny_model(dora=True, head=True, bias=True)
    optimizer = create_optimizer(
        model,
        method="adamw_large_wd",
        weight_decay=0.01,
        large_wd_on=large_wd_on,
        large_weight_decay=0.3,
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    pairs = find_lora_pairs(model)
    large = {id(pair.A) for pair in pairs}
    if large_wd_on == "AB":
        large |= {id(pair.B) for pair in pairs}
    large_group, other_group = optimizer.param_groups
    assert {id(p) for p in large_group["params"]} == large
    assert large_group["weight_decay"] == 0.3 and other_group["weight_decay"] == 0.01
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_adamw_large_wd_rejects_unknown_target():
    with pytest.raises(ValueError, match="large_wd_on"):
        create_optimizer(_tiny_model(), method="adamw_large_wd", large_wd_on="B")


def test_riemann_falls_back_to_identity_where_the_gram_is_singular():
    from stablelora.optim.riemann import damped_gram_inverses

    singular = torch.zeros(1, 2, 2, dtype=torch.float64)  # B = 0 and reg = 0: B^T B is 0
    regular = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
    inverse_singular, inverse_regular = damped_gram_inverses([singular, regular], reg=0.0)
    assert torch.equal(inverse_singular[0], torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(inverse_regular[0], torch.linalg.inv(regular[0]))


@pytest.mark.parametrize("ratio", [True, False, 0, -4.0, "16"])
def test_loraplus_lr_ratio_must_be_a_positive_number_not_a_bool(ratio):
    from stablelora.optim import check_optimizer_options

    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        check_optimizer_options("loraplus", {"loraplus_lr_ratio": ratio}, "optimizer=loraplus")
    check_optimizer_options("loraplus", {"loraplus_lr_ratio": 16}, "optimizer=loraplus")
