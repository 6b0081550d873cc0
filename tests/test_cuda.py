"""What only a CUDA device can show (``pytest -m cuda``; skipped without one).

``scripts/gpu_check.sh`` runs these on the first CUDA machine: the bf16 autocast training step,
Stable-LoRA's fused AdamW path against the foreach one, and Stable-LoRA's step without any
host-device synchronisation (the stacked Riemann/LoRA-RITE paths on CUDA are checked in
tests/test_optimizer_layouts.py).
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batches

from stablelora import StableLoRA, apply_lora, find_lora_pairs

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _lora_model(seed=0, B_std=0.0):
    model = apply_lora(
        tiny_llama(seed=seed),
        rank=4,
        alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    ).to(CUDA)
    if B_std:  # B far above the stop threshold: every layer stops on the first step
        with torch.no_grad():
            for pair in find_lora_pairs(model):
                pair.B.normal_(0, B_std)
    return model


def _stable_lora(model, **flags):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return StableLoRA(trainable, find_lora_pairs(model), lr=5e-3, shrink_ratio=1e-2, **flags)


def _loss(model, ids):
    ids = ids.to(CUDA)
    return model(input_ids=ids, labels=ids).loss


def test_bf16_autocast_training_step():
    model = _lora_model()
    optimizer = _stable_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for ids in token_batches(3):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(input_ids=ids.to(CUDA), labels=ids.to(CUDA))
        assert output.logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
        loss = output.loss
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if param.requires_grad:  # adapters and their gradients stay float32
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            assert not torch.equal(param, before[name]), f"{name} did not train"


def test_fused_adamw_path_matches_foreach():
    results = []
    for flags in ({"foreach": True}, {"fused": True}):
        model = _lora_model()
        optimizer = _stable_lora(model, **flags)
        for ids in token_batches(8):
            optimizer.zero_grad()
            _loss(model, ids).backward()
            optimizer.step()
        results.append((model, optimizer.shrink_state()))
    (foreach, foreach_flags), (fused, fused_flags) = results
    assert fused_flags == foreach_flags
    for (name, expected), actual in zip(foreach.named_parameters(), fused.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("B_std", [0.0, 1.0], ids=["shrinking", "stopped"])
def test_stable_lora_step_never_waits_for_the_device(B_std):
    model = _lora_model(B_std=B_std)
    optimizer = _stable_lora(model)
    batches = token_batches(6)
    optimizer.zero_grad()
    _loss(model, batches[0]).backward()
    optimizer.step()  # the first step creates AdamW's state
    for ids in batches[1:]:
        optimizer.zero_grad()
        _loss(model, ids).backward()
        torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    stop_steps = {state["stop_step"] for state in optimizer.shrink_state().values()}
    assert stop_steps == ({None} if B_std == 0.0 else {1})


def test_a_per_layer_python_comparison_is_caught_syncing():
    """The check above can fail: the authors' per-layer ``if`` on a norm syncs every layer."""
    pair = find_lora_pairs(_lora_model())[0]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            if pair.A.norm() < pair.numel_ratio * pair.B.norm():
                pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
