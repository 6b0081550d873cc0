"""The feature-update probe (stablelora.probes.gamma), the toy width model and the width sweep."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from helpers import probed_train_steps, toy_lora
from torch import nn

from stablelora import apply_lora, create_optimizer, find_lora_pairs
from stablelora.probes.feature_updates import feature_update_terms, rms, update_rms
from stablelora.probes.gamma import FeatureProbe
from stablelora.probes.quantities import QUANTITIES, gamma_value, gamma_values
from stablelora.toy import build_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


class OneLayer(nn.Module):
    """y = proj(x), a single 4 -> 3 linear layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.proj(x)


def forward_pre_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------- the decomposition
def test_decomposition_sums_to_dY():
    g = torch.Generator().manual_seed(0)
    r, n, m, T = 3, 7, 5, 11
    A, A_new = torch.randn(2, r, n, generator=g, dtype=torch.float64).unbind()
    B, B_new = torch.randn(2, m, r, generator=g, dtype=torch.float64).unbind()
    Z = torch.randn(T, n, generator=g, dtype=torch.float64)
    terms = feature_update_terms(A, B, A_new, B_new, Z, scale=2.5)
    total = terms["delta1"] + terms["delta2"] + terms["delta3"]
    assert terms["dY"].shape == (m, T)
    torch.testing.assert_close(total, terms["dY"], rtol=1e-12, atol=1e-12)
    # float32 as the probe computes it: equal to rounding.
    terms32 = feature_update_terms(*(t.float() for t in (A, B, A_new, B_new, Z)), scale=2.5)
    total32 = terms32["delta1"] + terms32["delta2"] + terms32["delta3"]
    torch.testing.assert_close(total32, terms32["dY"], rtol=1e-5, atol=1e-5)


def test_update_rms_matches_the_materialised_terms():
    g = torch.Generator().manual_seed(1)
    L, r, n, m, T = 3, 4, 9, 6, 13
    A, B, Z = (
        torch.randn(L, r, n, generator=g),
        torch.randn(L, m, r, generator=g),
        torch.randn(L, T, n, generator=g),
    )
    scale = torch.tensor([0.5, -2.0, 3.0])
    for step_size in (1.0, 1e-4):  # 1e-4: dY is 1e-4 of BAZ, where B'A'Z - BAZ cancels
        A_new = A + step_size * torch.randn(L, r, n, generator=g)
        B_new = B + step_size * torch.randn(L, m, r, generator=g)
        reference = feature_update_terms(
            *(t.double() for t in (A, B, A_new, B_new, Z)), scale.double().view(-1, 1, 1)
        )
        fast = update_rms(A, B, A_new, B_new, Z, scale)
        for q in ("delta1", "delta2", "delta3", "dY", "AZ"):
            assert fast[q].shape == (L,) and fast[q].dtype == torch.float32
            expected = rms(reference[q]).float()
            torch.testing.assert_close(fast[q], expected, rtol=2e-4, atol=0, msg=f"{q} {step_size}")


def test_gamma_value():
    assert gamma_value(16.0, 4) == pytest.approx(2.0)
    assert gamma_value(0.5, 4) == pytest.approx(-0.5)
    assert gamma_value(0.0, 4) == -math.inf
    assert math.isnan(gamma_value(1.0, 1))
    assert math.isnan(gamma_value(-1.0, 4)) and math.isnan(gamma_value(math.nan, 4))


def test_per_layer_gamma_is_recomputed_bit_for_bit_from_rms_and_width():
    # The run records store feat/<layer>/<q> and the width, not gamma: recomputing it with
    # gamma_values must give the probe's value exactly, one value at a time or in bulk.
    model, task = toy_lora()
    optimizer = create_optimizer(model, method="stable_lora", lr=1e-2, shrink_ratio=0.1)
    probe = FeatureProbe(model, find_lora_pairs(model), first_steps=3)
    rows = probed_train_steps(model, task, optimizer, probe, 3)
    names = [pair.name for pair in find_lora_pairs(model)]
    for metrics in rows:
        rms = np.array([[metrics[f"feat/{n}/{q}"] for q in QUANTITIES] for n in names])
        widths = np.array([metrics[f"lora/{n}/width"] for n in names])
        assert np.all(widths == [p.A.shape[1] for p in find_lora_pairs(model)])
        gammas = np.array([[metrics[f"gamma/{n}/{q}"] for q in QUANTITIES] for n in names])
        assert np.array_equal(gamma_values(rms, widths[:, None]), gammas)
        assert np.array_equal(
            gamma_values(rms.ravel(), widths.repeat(len(QUANTITIES))), gammas.ravel()
        )
        for name, width in zip(names, widths):
            assert gamma_value(metrics[f"feat/{name}/dY"], width) == metrics[f"gamma/{name}/dY"]


def _one_layer_setup(optimizer_name):
    """A 4 -> 3 LoRA layer (r = 2, s = 1) with A, B and the input X set by hand."""
    model = apply_lora(OneLayer(), rank=2, alpha=2.0, target_modules=["proj"])
    (pair,) = find_lora_pairs(model)
    A = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    B = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    X = np.array([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        pair.A.copy_(torch.tensor(A))
        pair.B.copy_(torch.tensor(B))
    params = [pair.A, pair.B]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.1)
    else:
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0, eps=1e-8)
    return model, pair, optimizer, A, B, X


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_values_match_an_independent_numpy_computation(optimizer_name):
    model, pair, optimizer, A, B, X = _one_layer_setup(optimizer_name)
    assert pair.name == "proj" and pair.scale == 1.0
    probe = FeatureProbe(model, [pair], first_steps=5, every=0)
    probe.arm(1)
    model(torch.tensor(X, dtype=torch.float32)).sum().backward()
    probe.before_update()
    optimizer.step()
    metrics = probe.after_update(optimizer)

    # Independent computation. loss = sum_t sum_i y_ti with y = x W0^T + s x A^T B^T, so
    # grad_B = s * 1_m (A X^T 1_T)^T and grad_A = s * (B^T 1_m)(X^T 1_T)^T.
    ones_m, x_sum = np.ones(3), X.sum(axis=0)  # (m,), (n,)
    grad_B = np.outer(ones_m, A @ x_sum)  # (m, r)
    grad_A = np.outer(B.T @ ones_m, x_sum)  # (r, n)
    if optimizer_name == "sgd":
        A_new, B_new = A - 0.1 * grad_A, B - 0.1 * grad_B
        direction_A = grad_A  # no Adam moments: the probe falls back to the gradient
    else:  # the first Adam step moves every entry by lr * g / (|g| + eps)
        direction_A = grad_A / (np.abs(grad_A) + 1e-8)
        A_new = A - 0.1 * direction_A
        B_new = B - 0.1 * grad_B / (np.abs(grad_B) + 1e-8)
    Zt = X.T
    expected = {
        "delta1": (B_new - B) @ A @ Zt,
        "delta2": B @ (A_new - A) @ Zt,
        "delta3": (B_new - B) @ (A_new - A) @ Zt,
        "dY": B_new @ A_new @ Zt - B @ A @ Zt,
        "gAZ": direction_A @ Zt,
        "AZ": A @ Zt,
        "Z": X,
    }
    for q, value in expected.items():
        rms = np.sqrt(np.mean(value**2))
        assert metrics[f"feat/proj/{q}"] == pytest.approx(rms, rel=1e-5), q
        assert metrics[f"gamma/proj/{q}"] == pytest.approx(math.log(rms) / math.log(4), rel=1e-5)
        assert metrics[f"feat/{q}"] == pytest.approx(rms, rel=1e-5)  # one layer: mean = itself
    assert metrics["lora/proj/norm_A"] == pytest.approx(np.linalg.norm(A_new), rel=1e-6)
    assert metrics["lora/proj/norm_B"] == pytest.approx(np.linalg.norm(B_new), rel=1e-6)
    assert not any(k.endswith("/shrinking") for k in metrics)  # AdamW records no layer state
    probe.close()


class SideBySide(nn.Module):
    """Linear layers side by side, each reading its own slice of the input columns."""

    def __init__(self, shapes):
        super().__init__()
        self.widths = [n for n, _ in shapes]
        self.layers = nn.ModuleList(nn.Linear(n, m, bias=False) for n, m in shapes)

    def forward(self, x):
        parts = x.split(self.widths, dim=-1)
        return sum(layer(part).sum() for layer, part in zip(self.layers, parts))


@dataclass
class Uniform:
    """One LoRA layer whose A (r, n), B (m, r) and input Z (T, n) hold one value each:
    A = a J, B = b J, Z = c J (J: all ones). Under the loss ``sum(outputs)`` its gradients stay
    uniform, ``grad_B = s T c a n J`` and ``grad_A = s T c b m J``, so every quantity the probe
    measures has a closed form in the scalars (the formulas in :meth:`expected`)."""

    n: int
    m: int
    c: float
    a: float
    b: float
    r: int = 0  # the LoRA rank, set by the test (one rank for every layer)
    moments: dict = field(default_factory=dict)  # Adam's (m, v) of A and B, by name

    def step(self, optimizer: str, lr: float, s: float, T: int, t: int) -> dict[str, float]:
        """Step ``t`` (1-based) on the scalars; returns the expected metrics of the step."""
        grad_a, grad_b = s * T * self.c * self.b * self.m, s * T * self.c * self.a * self.n
        if optimizer == "sgd":
            direction_a, direction_b = grad_a, grad_b  # the probe falls back to A's gradient
        else:  # AdamW without weight decay, its default betas and eps = 1e-8
            (beta1, beta2), eps, directions = (0.9, 0.999), 1e-8, []
            for name, grad in (("a", grad_a), ("b", grad_b)):
                mean, square = self.moments.get(name, (0.0, 0.0))
                mean, square = (
                    beta1 * mean + (1 - beta1) * grad,
                    beta2 * square + (1 - beta2) * grad**2,
                )
                self.moments[name] = (mean, square)
                m_hat, v_hat = mean / (1 - beta1**t), square / (1 - beta2**t)
                directions.append(m_hat / (math.sqrt(v_hat) + eps))
            direction_a, direction_b = directions
        a, b = self.a, self.b
        self.a, self.b = a - lr * direction_a, b - lr * direction_b
        return self.expected(a, b, direction_a, s)

    def expected(self, a: float, b: float, direction_a: float, s: float) -> dict[str, float]:
        """RMS of each quantity for the step from (a, b) to (self.a, self.b). Each term is a
        uniform (rows, T) matrix: its RMS is the absolute value of its entry; (J_{m,r} J_{r,n}
        J_{n,T}) = r n J_{m,T} gives the factor r n of the products through A."""
        r_n_c = self.r * self.n * self.c
        delta_a, delta_b = self.a - a, self.b - b
        return {
            "delta1": abs(s * delta_b * a * r_n_c),
            "delta2": abs(s * b * delta_a * r_n_c),
            "delta3": abs(s * delta_b * delta_a * r_n_c),
            "dY": abs(s * (self.b * self.a - b * a) * r_n_c),
            "gAZ": abs(direction_a * self.n * self.c),
            "AZ": abs(a * self.n * self.c),
            "Z": abs(self.c),
            "norm_A": abs(self.a) * math.sqrt(self.r * self.n),
            "norm_B": abs(self.b) * math.sqrt(self.m * self.r),
        }


CLOSED_FORM_CASES = {
    # one layer, s = alpha / r = 1.5, a subsample of 2 of the 5 token rows
    "one_layer_sgd": dict(
        layers=[Uniform(n=4, m=3, c=0.5, a=0.3, b=0.2)],
        rank=2, alpha=3.0, T=5, optimizer="sgd", lr=0.01, steps=4, max_tokens=2,
    ),
    # B = 0 at first, as LoRA initialises it: A does not move on step 1 (delta2 = delta3 = 0)
    "two_layers_sgd": dict(
        layers=[Uniform(n=16, m=8, c=0.25, a=0.1, b=0.0), Uniform(n=6, m=10, c=1.0, a=-0.2, b=0.05)],
        rank=1, alpha=1.0, T=3, optimizer="sgd", lr=0.02, steps=4, max_tokens=64,
    ),
    "two_layers_adamw": dict(
        layers=[Uniform(n=16, m=8, c=0.25, a=0.1, b=0.0), Uniform(n=6, m=10, c=1.0, a=-0.2, b=0.05)],
        rank=3, alpha=6.0, T=4, optimizer="adamw", lr=0.05, steps=3, max_tokens=64,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CLOSED_FORM_CASES)
def test_values_match_closed_forms_over_several_steps_layers_and_shapes(case):
    spec = CLOSED_FORM_CASES[case]
    layers, rank, T = [copy.deepcopy(u) for u in spec["layers"]], spec["rank"], spec["T"]
    model = apply_lora(
        SideBySide([(u.n, u.m) for u in layers]),
        rank=rank,
        alpha=spec["alpha"],
        target_modules=["layers.0", "layers.1"][: len(layers)],
    )
    pairs = find_lora_pairs(model)
    s = spec["alpha"] / rank
    for pair, u in zip(pairs, layers):
        u.r = rank
        assert pair.scale == s and pair.A.shape == (rank, u.n) and pair.B.shape == (u.m, rank)
        with torch.no_grad():
            pair.A.fill_(u.a)
            pair.B.fill_(u.b)
    params = [p for pair in pairs for p in (pair.A, pair.B)]
    if spec["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec["lr"])
    else:
        optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, eps=1e-8)
    X = torch.cat([torch.full((T, u.n), u.c) for u in layers], dim=1)
    probe = FeatureProbe(model, pairs, first_steps=spec["steps"], max_tokens=spec["max_tokens"])
    for step in range(1, spec["steps"] + 1):
        probe.arm(step)
        model(X).backward()
        probe.before_update()
        optimizer.step()
        metrics = probe.after_update(optimizer)
        optimizer.zero_grad()
        expected = [u.step(spec["optimizer"], spec["lr"], s, T, step) for u in layers]
        for pair, u, values in zip(pairs, layers, expected):
            # The premise of the closed forms: the optimizer kept A and B uniform.
            torch.testing.assert_close(pair.A, torch.full_like(pair.A, u.a), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(pair.B, torch.full_like(pair.B, u.b), rtol=1e-5, atol=1e-7)
            where = f"{case} step {step} {pair.name}"
            assert metrics[f"lora/{pair.name}/width"] == u.n
            for key in ("norm_A", "norm_B"):
                assert metrics[f"lora/{pair.name}/{key}"] == pytest.approx(values[key], rel=1e-5)
            for q in QUANTITIES:
                if values[q] == 0.0:  # exactly zero, as the closed form says: gamma -inf
                    assert metrics[f"feat/{pair.name}/{q}"] == 0.0, (where, q)
                    assert metrics[f"gamma/{pair.name}/{q}"] == -math.inf, (where, q)
                    continue
                got = metrics[f"feat/{pair.name}/{q}"]
                assert got == pytest.approx(values[q], rel=1e-4), (where, q)
                gamma = math.log(values[q]) / math.log(u.n)
                assert metrics[f"gamma/{pair.name}/{q}"] == pytest.approx(gamma, rel=1e-4, abs=1e-6)
        # The aggregates: the mean over layers of the RMS, and of each layer's own gamma.
        for q in QUANTITIES:
            rms_values = [values[q] for values in expected]
            gammas = [
                math.log(v) / math.log(u.n) if v > 0 else -math.inf
                for v, u in zip(rms_values, layers)
            ]
            assert metrics[f"feat/{q}"] == pytest.approx(np.mean(rms_values), rel=1e-4, abs=1e-12)
            assert metrics[f"gamma/{q}"] == pytest.approx(np.mean(gammas), rel=1e-4, abs=1e-6)
        for key in ("norm_A", "norm_B"):
            mean = np.mean([values[key] for values in expected])
            assert metrics[f"lora/{key}"] == pytest.approx(mean, rel=1e-5)
    assert layers[0].b != 0.0 and layers[0].a != spec["layers"][0].a  # both factors moved
    probe.close()


# ---------------------------------------------------------------------- cadence, on / off
def test_cadence():
    model, _ = toy_lora()
    pairs = find_lora_pairs(model)
    probe = FeatureProbe(model, pairs, first_steps=3, every=5)
    assert [t for t in range(1, 21) if probe.is_logging_step(t)] == [1, 2, 3, 5, 10, 15, 20]
    only_first = FeatureProbe(model, pairs, first_steps=3, every=0)
    assert [t for t in range(1, 21) if only_first.is_logging_step(t)] == [1, 2, 3]
    only_first.close()
    probe.close()


def test_logs_exactly_on_logging_steps_and_keeps_nothing_between():
    model, task = toy_lora()
    pairs = find_lora_pairs(model)
    optimizer = create_optimizer(model, "lora", lr=1e-3)
    probe = FeatureProbe(model, pairs, first_steps=2, every=3)
    held = []
    for step in range(1, 8):
        probe.arm(step)
        model(**task.collate(list(range(8)))).loss.backward()
        probe.before_update()
        held.append(probe.holds_snapshots)
        optimizer.step()
        metrics = probe.after_update(optimizer)
        optimizer.zero_grad()
        assert bool(metrics) == (step in (1, 2, 3, 6)), step
        assert not probe.holds_snapshots
    assert held == [True, True, True, False, False, True, False]
    probe.close()


def test_disabled_registers_no_hooks_and_keeps_no_snapshots():
    model, task = toy_lora()
    optimizer = create_optimizer(model, "stable_lora", lr=1e-3)
    probe = FeatureProbe(model, find_lora_pairs(model), enabled=False)
    assert probe.num_hooks == 0 and forward_pre_hooks(model) == 0
    for step in range(1, 4):
        assert probe.arm(step) is False
        model(**task.collate(list(range(8)))).loss.backward()
        probe.before_update()
        assert not probe.holds_snapshots
        optimizer.step()
        assert probe.after_update(optimizer) == {}
        optimizer.zero_grad()


def test_close_removes_the_hooks():
    model, _ = toy_lora(depth=3)
    probe = FeatureProbe(model, find_lora_pairs(model))
    assert probe.num_hooks == 3 and forward_pre_hooks(model) == 3
    probe.close()
    assert probe.num_hooks == 0 and forward_pre_hooks(model) == 0


def test_after_update_without_before_update_is_an_error():
    model, task = toy_lora()
    probe = FeatureProbe(model, find_lora_pairs(model))
    probe.arm(1)
    model(**task.collate([0, 1]))
    with pytest.raises(RuntimeError, match="before_update"):
        probe.after_update()
    probe.close()


# ---------------------------------------------------------------------- keys and state
def test_per_layer_and_aggregate_keys_with_shrink_state():
    model, task = toy_lora(depth=2)
    pairs = find_lora_pairs(model)
    names = [pair.name for pair in pairs]
    assert names == ["blocks.0.fc", "blocks.1.fc"]
    optimizer = create_optimizer(model, "stable_lora", lr=1e-3, shrink_ratio=1e-2)
    probe = FeatureProbe(model, pairs, first_steps=1)
    (metrics,) = probed_train_steps(model, task, optimizer, probe, steps=1)
    for q in QUANTITIES:
        assert f"feat/{q}" in metrics and f"gamma/{q}" in metrics
        for name in names:
            assert f"feat/{name}/{q}" in metrics and f"gamma/{name}/{q}" in metrics
        mean = np.mean([metrics[f"feat/{name}/{q}"] for name in names])
        assert metrics[f"feat/{q}"] == pytest.approx(mean)
    for name in names:
        assert metrics[f"lora/{name}/norm_A"] > 0
        assert metrics[f"lora/{name}/shrinking"] == 1.0  # B = 0 on step 1: every layer shrinks
        assert f"lora/{name}/stop_step" not in metrics
    assert "lora/shrinking" not in metrics  # the fraction is the runner's, under one key
    assert metrics["feat/delta2"] == 0.0 and metrics["gamma/delta2"] == -math.inf  # B0 = 0

    probe.close()
    aggregates_only = FeatureProbe(model, pairs, first_steps=1, per_layer=False)
    (metrics,) = probed_train_steps(model, task, optimizer, aggregates_only, steps=1)
    assert all(key.count("/") == 1 for key in metrics)
    aggregates_only.close()


def test_stop_step_is_logged_once_a_layer_stops():
    model, task = toy_lora(width=16, depth=1)
    optimizer = create_optimizer(model, "stable_lora", lr=5e-2, shrink_ratio=0.2)
    probe = FeatureProbe(model, find_lora_pairs(model), first_steps=30)
    history = probed_train_steps(model, task, optimizer, probe, steps=30)
    stopped = [m for m in history if m["lora/blocks.0.fc/shrinking"] == 0.0]
    assert stopped, "the layer should stop shrinking within 30 steps"
    state = optimizer.shrink_state()["blocks.0.fc"]
    assert stopped[-1]["lora/blocks.0.fc/stop_step"] == state["stop_step"]


def test_a_wrapped_model_is_probed_through_the_pairs_tensors():
    model, task = toy_lora(width=16, depth=2)

    class Wrapper(nn.Module):  # like DDP: the model under .module, forward passed through
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **batch):
            return self.module(**batch)

    wrapped = Wrapper(model)
    pairs = find_lora_pairs(model)  # names without the wrapper's prefix
    optimizer = create_optimizer(model, "stable_lora", lr=1e-3)
    probe = FeatureProbe(wrapped, pairs, first_steps=1)
    (metrics,) = probed_train_steps(wrapped, task, optimizer, probe, steps=1)
    assert metrics["feat/blocks.1.fc/dY"] > 0 and metrics["lora/blocks.1.fc/shrinking"] == 1.0
    with pytest.raises(ValueError, match="find_lora_pairs"):
        FeatureProbe(toy_lora(width=16)[0], pairs)  # pairs of another model
    probe.close()


# ---------------------------------------------------------------------- capture
def test_inputs_are_subsampled_deterministically():
    model, _ = toy_lora(width=16, depth=1)
    probe = FeatureProbe(model, find_lora_pairs(model), max_tokens=10)
    probe.arm(1)
    embedded = []
    handle = model.base_model.model.embed.register_forward_hook(
        lambda m, a, out: embedded.append(out)
    )
    model(inputs=torch.randn(4, 25, 16))  # (batch, seq, d_in): 100 token positions
    handle.remove()
    Z = probe.layers[0].Z
    rows = embedded[0].reshape(-1, 16)
    assert Z.shape == (10, 16) and Z.dtype == torch.float32
    torch.testing.assert_close(Z[0], rows[0])
    torch.testing.assert_close(Z[-1], rows[-1])  # evenly spaced, ends included
    # Z is the LoRA layer's input, which for the first block is the embedding's output.
    index = torch.linspace(0, 99, 10).round().long()
    torch.testing.assert_close(Z, rows[index])
    probe.close()


def test_gradient_accumulation_captures_the_first_micro_batch_only():
    model, task = toy_lora(width=16, depth=1)
    optimizer = create_optimizer(model, "lora", lr=1e-3)
    probe = FeatureProbe(model, find_lora_pairs(model))
    probe.arm(1)
    first, second = task.collate([0, 1, 2]), task.collate([3, 4, 5])
    model(**first).loss.backward()
    Z_first = probe.layers[0].Z.clone()
    model(**second).loss.backward()
    torch.testing.assert_close(probe.layers[0].Z, Z_first)
    probe.before_update()
    optimizer.step()
    assert probe.after_update(optimizer)
    probe.close()


def test_bf16_autocast_measures_what_float32_training_measures():
    """Under bf16 autocast (the probe turns it off for its own products) every value on both
    steps matches a float32 twin of the run within what bf16 training itself moves (5%), the
    exact zeros of step 1 included: no cancellation in dY, no value lost to bf16."""

    def probed_steps(bf16):
        model, task = toy_lora(width=32, depth=2)
        optimizer = create_optimizer(model, "stable_lora", lr=1e-3)
        probe = FeatureProbe(model, find_lora_pairs(model), first_steps=2)
        history = []
        for step in (1, 2):
            probe.arm(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(**task.collate(list(range(8)))).loss.backward()
            probe.before_update()
            optimizer.step()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                history.append(probe.after_update(optimizer))
            optimizer.zero_grad()
        probe.close()
        return history

    bf16, float32 = probed_steps(True), probed_steps(False)
    for step, (ours, twin) in enumerate(zip(bf16, float32), start=1):
        assert ours.keys() == twin.keys()
        for key, value in twin.items():
            assert isinstance(ours[key], float), key
            if value == 0.0 or math.isinf(value):  # B0 = 0: delta2 and gAZ on step 1
                assert ours[key] == value, (step, key)
            else:
                assert ours[key] == pytest.approx(value, rel=5e-2), (step, key)
    assert bf16[1]["feat/dY"] > 0 and bf16[1]["feat/delta2"] > 0 and bf16[1]["feat/gAZ"] > 0


# ---------------------------------------------------------------------- the toy model
def test_toy_activations_are_order_one_at_every_width():
    for width in (64, 1024):
        model = build_toy_model(width, depth=3, seed=0)
        h = model.embed(torch.randn(256, 16))
        for block in model.blocks:
            h = block(h)
            assert 0.7 < h.square().mean().sqrt() < 1.4, width
        assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(
        build_toy_model(32, 2, 5).blocks[1].fc.weight, build_toy_model(32, 2, 5).blocks[1].fc.weight
    )


def test_toy_task_contract_and_learnability():
    model, task = toy_lora(width=64, depth=2)
    batch = task.collate([0, 1, 2])
    assert set(batch) == {"inputs", "targets"} and batch["inputs"].shape == (3, 16)
    assert task.num_train_examples == 64 and task.main_metric == "loss" and task.name
    before = task.evaluate(model, batch_size=16)
    assert before["n"] == 32 and 0.1 < before["loss"] < 20  # Theta(1) signal
    assert task.evaluate(model, batch_size=16, max_examples=10)["n"] == 10
    optimizer = create_optimizer(model, "lora", lr=1e-2)
    probe = FeatureProbe(model, find_lora_pairs(model), enabled=False)
    probed_train_steps(model, task, optimizer, probe, steps=60, batch_size=16)
    assert task.evaluate(model, batch_size=16)["loss"] < 0.7 * before["loss"]


# ---------------------------------------------------------------------- the width fit
def test_t_quantile_and_slope_fit():
    from analysis.width_fit import fit_slope, t_quantile

    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=2e-3)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962, abs=2e-3)
    log_n = np.log(np.array([128.0, 256, 512, 1024]))
    exact = fit_slope(log_n, 0.5 * log_n + 1.0)
    assert exact["exponent"] == pytest.approx(0.5) and exact["r2"] == pytest.approx(1.0)
    noisy = fit_slope(np.repeat(log_n, 3), 0.5 * np.repeat(log_n, 3) + np.tile([0.1, -0.1, 0], 4))
    assert noisy["ci_low"] < 0.5 < noisy["ci_high"] and noisy["points"] == 12


@pytest.mark.slow
def test_width_sweep_smoke_runs_through_the_runner_and_writes_the_exponent_table(tmp_path):
    from experiments.width_sweep import main

    result = main(["--scale", "smoke", "--output-root", str(tmp_path), "trainer.max_steps=8"])
    sweep = tmp_path / "sweeps" / "width_sweep_smoke"
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 6 and {s["status"] for s in summaries} == {"completed"}
    table = result["table"]
    assert set(table["method"]) == {"lora", "stable_lora"}
    assert {"delta1", "delta2", "delta3", "dY", "gAZ"} <= set(table.columns)
    # records.jsonl: one line per run, its method and width, and the feat/* rows it logged
    lines = (sweep / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6 and {r["status"] for r in records} == {"completed"}
    assert len({(r["method"], r["width"]) for r in records}) == 6
    assert {r["method"] for r in records} == {"lora", "stable_lora"}
    for record in records:
        assert record["metrics"], record["run_dir"]
        assert all(any(k.startswith("feat/") for k in row) for row in record["metrics"])
    # the report: the fits as returned, the markdown as printed, real PNG and PDF figures
    import pandas as pd

    from analysis.tables.formatting import CSV_DIGITS

    report = sweep / "report"
    figures = ["width_fit.png", "width_fit.pdf", "exponents_vs_step.png", "exponents_vs_step.pdf"]
    assert sorted(p.name for p in result["files"]) == sorted(
        ["exponents.csv", "exponents.md", *figures]
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(report / "exponents.csv"),
        result["fits"].reset_index(drop=True),
        check_dtype=False,
        rtol=10 ** (1 - CSV_DIGITS),
    )
    assert (report / "exponents.md").read_text() == result["markdown"] + "\n"
    assert "Assumption 1" in result["markdown"]
    for name in figures:
        magic = b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"%PDF-"
        assert (report / name).read_bytes().startswith(magic), name
    fits = result["fits"]
    gaz = fits[(fits["quantity"] == "gAZ") & (fits["step"] == 2)]
    # Assumption 1 at step 2: g_A Z grows like n (Adam directions have entries of order one).
    assert len(gaz) == 2 and gaz["exponent"].between(0.7, 1.3).all()
