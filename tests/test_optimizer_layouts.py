"""Riemann and LoRA-RITE: the stacked layout (accelerators) against the per-layer one (CPU).

Both layouts compute one algorithm; ``layout="stacked"`` forces on CPU the path that CUDA runs
by default, so these float64 runs of many steps guard it on a machine without a GPU. The
layers cover every case the layouts treat differently: stacks of several same-shape layers,
GQA-narrow B (m < n), tall B with an even row count (the per-layer path multiplies it as an
(m/2, 2r) view) and an odd one, a layer missing its gradients on some steps (its step count
splits it from its stack), two parameter groups, skipped and non-finite gradients, and
non-factor parameters (DoRA-like magnitudes, a head) next to the factors.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batches
from torch import nn

from stablelora import apply_lora, find_lora_pairs
from stablelora.optim.lora_rite import LoRARITE
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.riemann import RiemannianAdamW, riemannian_gradients

F64 = torch.float64
RANK = 4
SCALE = 2.0
# (m, n) of each layer: B is (m, r), A is (r, n).
SHAPES = [
    *[(24, 24)] * 3,  # a stack of three square layers
    *[(8, 24)] * 2,  # GQA-narrow k/v projections
    *[(512, 24)] * 2,  # tall B, paired rows on the per-layer path
    (257, 16),  # tall B with an odd row count: never paired
]
SILENT_LAYER, SILENT_STEPS = 1, (2, 5)  # no gradients at these steps
OTHER_GROUP_LAYER = 3  # its factors train in a second parameter group (twice the lr)
STEPS = 12


class _Problem(nn.Module):
    """LoRA layers fitted to fixed targets through DoRA-like magnitudes, plus a head."""

    def __init__(self, seed: int, zero_B_layer: int | None = None, device: str = "cpu"):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape, std=1.0):
            return std * torch.randn(*shape, generator=generator, dtype=F64)

        self.A = nn.ParameterList(nn.Parameter(randn(RANK, n, std=0.3)) for _, n in SHAPES)
        self.B = nn.ParameterList(nn.Parameter(randn(m, RANK, std=0.3)) for m, _ in SHAPES)
        if zero_B_layer is not None:
            self.B[zero_B_layer].data.zero_()
        self.magnitude = nn.ParameterList(nn.Parameter(1 + randn(m, std=0.1)) for m, _ in SHAPES)
        self.head = nn.Parameter(randn(6, 5))
        self.targets = [randn(m, n, std=0.5) for m, n in SHAPES]
        self.head_target = randn(6, 5)
        self.to(device)
        self.targets = [target.to(device) for target in self.targets]
        self.head_target = self.head_target.to(device)

    def pairs(self) -> list[LoRAPair]:
        return [LoRAPair(f"layer{i}", A, B, SCALE) for i, (A, B) in enumerate(zip(self.A, self.B))]

    def param_groups(self, lr: float) -> list[dict]:
        other = [self.A[OTHER_GROUP_LAYER], self.B[OTHER_GROUP_LAYER]]
        main = [p for p in self.parameters() if all(p is not q for q in other)]
        return [{"params": main}, {"params": other, "lr": 2 * lr}]

    def backward(self, step: int, nan_at: tuple[int, int] | None = None) -> None:
        loss = 0.5 * (self.head - self.head_target).square().sum()
        for i, (A, B, magnitude, target) in enumerate(
            zip(self.A, self.B, self.magnitude, self.targets)
        ):
            if i == SILENT_LAYER and step in SILENT_STEPS:
                continue
            loss = loss + 0.05 * (magnitude[:, None] * (SCALE * B @ A) - target).square().sum()
        loss.backward()
        if nan_at is not None and step == nan_at[0]:
            self.B[nan_at[1]].grad[0, 0] = float("nan")


def _train(
    make_optimizer, layout, *, seed=0, zero_B_layer=None, nan_at=None, steps=STEPS, device="cpu"
):
    problem = _Problem(seed, zero_B_layer, device)
    optimizer = make_optimizer(problem, layout)
    start = [p.detach().clone() for p in problem.parameters()]
    for step in range(steps):
        optimizer.zero_grad()
        problem.backward(step, nan_at)
        optimizer.step()
    return problem, optimizer, start


def _assert_layouts_agree(make_optimizer, **problem):
    per_layer, optimizer_p, start = _train(make_optimizer, "per_layer", **problem)
    stacked, optimizer_s, _ = _train(make_optimizer, "stacked", **problem)
    for i in range(len(SHAPES)):
        for name in ("A", "B"):
            expected, actual = getattr(per_layer, name)[i], getattr(stacked, name)[i]
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    for expected, actual in zip(per_layer.parameters(), stacked.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    for expected, actual in zip(optimizer_p.state.values(), optimizer_s.state.values()):
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-10, atol=1e-12)
    # The runs really trained every factor (a frozen or skipped-forever layer proves nothing).
    moved = [
        (p - p0).abs().max().item() for p, p0 in zip(per_layer.parameters(), start) if p.ndim == 2
    ]
    assert min(moved) > 1e-4
    return per_layer


RITE_VARIANTS = {
    "defaults": {},
    "escape, capping, weight decay, clip": {
        "apply_escape": True,
        "update_capping": 0.05,
        "weight_decay": 0.1,
        "clip_unmagnified_grad": 0.5,
        "update_skipping": 0.0,
        "betas": (0.8, 0.95),
    },
    "no clip, tight skipping": {"clip_unmagnified_grad": 0.0, "update_skipping": 0.3},
}


def _rite(options):
    def make(problem, layout):
        return LoRARITE(
            problem.param_groups(lr=0.02), problem.pairs(), lr=0.02, layout=layout, **options
        )

    return make


@pytest.mark.parametrize("variant", list(RITE_VARIANTS))
def test_lora_rite_stacked_layout_matches_per_layer(variant):
    _assert_layouts_agree(_rite(RITE_VARIANTS[variant]))


def test_lora_rite_layouts_agree_on_skipped_and_non_finite_gradients():
    # Layer 5's B gets a NaN gradient at step 4 (skipped); B = 0 at layer 0 freezes its A first.
    problem = _assert_layouts_agree(_rite({}), zero_B_layer=0, nan_at=(4, 5))
    assert all(torch.isfinite(p).all() for p in problem.parameters())


RIEMANN_VARIANTS = {
    "defaults": {},
    "authors' variant": {"authors_variant": True},
    "scaled GD": {"scaled_gd": True, "lr": 0.002},
}


def _riemann(options):
    def make(problem, layout):
        lr = options.get("lr", 0.02)
        rest = {k: v for k, v in options.items() if k != "lr"}
        return RiemannianAdamW(
            problem.param_groups(lr), problem.pairs(), lr=lr, layout=layout, **rest
        )

    return make


@pytest.mark.parametrize("variant", list(RIEMANN_VARIANTS))
def test_riemann_stacked_layout_matches_per_layer(variant):
    _assert_layouts_agree(_riemann(RIEMANN_VARIANTS[variant]))


def test_riemann_layouts_agree_where_the_gram_is_singular():
    # reg = 0 and B = 0: the identity fallback on one layer of a stack.
    _assert_layouts_agree(_riemann({"reg": 0.0}), zero_B_layer=0)


def test_riemannian_gradients_stacked_flag():
    problem = _Problem(seed=3)
    problem.backward(step=0)
    grads_A, grads_B = [A.grad for A in problem.A], [B.grad for B in problem.B]
    per_layer = riemannian_gradients(
        grads_A, list(problem.B), grads_B, list(problem.A), 1e-3, stacked=False
    )
    stacked = riemannian_gradients(
        grads_A, list(problem.B), grads_B, list(problem.A), 1e-3, stacked=True
    )
    for expected, actual in zip(per_layer[0] + per_layer[1], stacked[0] + stacked[1]):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    damped = problem.B[0].detach().T @ problem.B[0].detach() + 1e-3 * torch.eye(RANK, dtype=F64)
    torch.testing.assert_close(stacked[0][0], torch.linalg.solve(damped, grads_A[0]))


@pytest.mark.parametrize("method", [LoRARITE, RiemannianAdamW])
def test_layouts_agree_on_a_dora_model(method):
    """peft's DoRA layers of a tiny Llama (GQA: k/v's B are narrower), a head and biases."""

    def train(layout):
        model = apply_lora(
            tiny_llama(seed=0, dtype=F64, attention_bias=True),
            rank=RANK,
            alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            use_dora=True,
            modules_to_save=["lm_head"],
        )
        with torch.no_grad():
            for pair in find_lora_pairs(model):  # B = 0 would give A no gradient at first
                pair.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(pair.name)))
        for name, param in model.named_parameters():
            if name.endswith("base_layer.bias"):
                param.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = method(trainable, find_lora_pairs(model), lr=1e-2, layout=layout)
        for ids in token_batches(6):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        return model

    per_layer, stacked = train("per_layer"), train("stacked")
    names = [name for name, p in per_layer.named_parameters() if p.requires_grad]
    assert any("magnitude" in name for name in names) and any("bias" in name for name in names)
    for (name, expected), actual in zip(per_layer.named_parameters(), stacked.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=name)


def test_unknown_layout_is_rejected():
    problem = _Problem(seed=0)
    with pytest.raises(ValueError, match="layout must be one of auto, per_layer, stacked"):
        LoRARITE(list(problem.parameters()), problem.pairs(), layout="batched")


@pytest.mark.parametrize(
    ("method", "batched_op"), [(LoRARITE, "aten::baddbmm"), (RiemannianAdamW, "aten::bmm")]
)
def test_layout_option_selects_the_path(method, batched_op):
    """The comparisons above mean something only if ``layout`` really switches the path."""

    def aten_ops(layout):
        problem = _Problem(seed=0)
        optimizer = method(list(problem.parameters()), problem.pairs(), lr=1e-3, layout=layout)
        problem.backward(step=0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            optimizer.step()
        return {event.key for event in prof.key_averages()}

    assert batched_op in aten_ops("stacked")
    assert batched_op not in aten_ops("per_layer")
    assert batched_op not in aten_ops("auto")  # CPU tensors: per layer


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora_rite", "riemann"])
def test_cuda_default_layout_matches_the_cpu_per_layer_path(method):
    """On CUDA, ``layout="auto"`` is the stacked path: the same training as on CPU, float64."""
    make = (
        _rite(RITE_VARIANTS["escape, capping, weight decay, clip"])
        if method == "lora_rite"
        else _riemann({})
    )
    on_cpu, _, _ = _train(make, "per_layer", zero_B_layer=0, nan_at=(4, 5))
    on_cuda, _, _ = _train(make, "auto", zero_B_layer=0, nan_at=(4, 5), device="cuda")
    for expected, actual in zip(on_cpu.parameters(), on_cuda.parameters()):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-8, atol=1e-10)
