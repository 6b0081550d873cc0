"""A toy model family of any width n, and a teacher task, for width sweeps of the gamma-function.

The student is a frozen random "pretrained" network::

    inputs (batch, d_in) --embed--> h_0 (batch, n)
        --[h -> sqrt(2) * relu(fc(h))] x depth--> h_L (batch, n) --head--> (batch, d_out)

with every weight drawn N(0, 1 / fan_in), so each pre-activation has Theta(1) entries at every
width and the He gain sqrt(2) keeps the second moment of h_l at one through the ReLUs. LoRA
goes on the square ``fc`` layers (n x n), the only layers whose width varies::

    model = apply_lora(build_toy_model(width, depth, seed), target_modules=TOY_TARGET_MODULES)

The teacher is the same network with a fixed random rank-k perturbation of every ``fc``::

    W_teacher = W + strength / sqrt(n * k) * U @ V.T,   U, V (n, k) with N(0, 1) entries

scaled so that ``(W_teacher - W) h`` has Theta(1) entries at every width: the target differs
from the student's initial output by Theta(1) at every n, and a rank >= k LoRA can fit it
exactly. The task is regression of the teacher's output, mean squared error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TOY_TARGET_MODULES = ("fc",)


@dataclass
class ToyOutput:
    """What :class:`ToyNet` returns, like a transformers ``ModelOutput``."""

    loss: torch.Tensor | None
    predictions: torch.Tensor  # (batch, d_out)


class ToyBlock(nn.Module):
    """``h -> sqrt(2) * relu(fc(h))``, fc square (n x n) without bias."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0) * F.relu(self.fc(h))


class ToyNet(nn.Module):
    """Frozen random features of width n (see the module docstring)."""

    def __init__(self, width: int, depth: int, d_in: int = 16, d_out: int = 8):
        super().__init__()
        self.width, self.depth = width, depth
        self.embed = nn.Linear(d_in, width, bias=False)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, d_out, bias=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> ToyOutput:
        """inputs (batch, d_in), targets (batch, d_out) -> ToyOutput (MSE loss if targets)."""
        h = self.embed(inputs)
        for block in self.blocks:
            h = block(h)
        predictions = self.head(h)
        loss = None if targets is None else F.mse_loss(predictions.float(), targets.float())
        return ToyOutput(loss=loss, predictions=predictions)


@torch.no_grad()
def build_toy_model(width: int, depth: int = 2, seed: int = 0, d_in: int = 16, d_out: int = 8):
    """A :class:`ToyNet` with every weight N(0, 1/fan_in), drawn from ``seed`` alone.

    All parameters are frozen: it plays a pretrained model, LoRA adapters are what trains.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got {width}, {depth}.")
    model = ToyNet(width, depth, d_in, d_out)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fan_in = module.weight.shape[1]
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            module.weight.div_(math.sqrt(fan_in))
    model.requires_grad_(False)
    return model


class ToyTeacherTask:
    """Regress the output of a perturbed copy of the toy network (the runner's Task contract).

    Args:
        width, depth, seed: the student, exactly ``build_toy_model(width, depth, seed)``.
        num_train, num_eval: examples; inputs are N(0, 1) vectors of size d_in.
        teacher_rank: k, the rank of the perturbation of every fc layer.
        teacher_strength: its size; entries of ``(W_teacher - W) h`` have RMS about this.
        d_in, d_out: input and output sizes (fixed, independent of the width).

    Attributes:
        name, main_metric ("loss", lower is better), num_train_examples.
    """

    main_metric = "loss"
    greater_is_better = False

    def __init__(
        self,
        width: int,
        depth: int = 2,
        seed: int = 0,
        *,
        num_train: int = 2048,
        num_eval: int = 256,
        teacher_rank: int = 4,
        teacher_strength: float = 1.0,
        d_in: int = 16,
        d_out: int = 8,
    ):
        self.name = f"toy_teacher_n{width}_L{depth}"
        self.width, self.depth, self.seed = width, depth, seed
        teacher = build_toy_model(width, depth, seed, d_in, d_out)
        generator = torch.Generator().manual_seed(seed + 1_000_003)
        with torch.no_grad():
            for block in teacher.blocks:
                U = torch.randn(width, teacher_rank, generator=generator)
                V = torch.randn(width, teacher_rank, generator=generator)
                block.fc.weight.add_(
                    U @ V.T, alpha=teacher_strength / math.sqrt(width * teacher_rank)
                )
            inputs = torch.randn(num_train + num_eval, d_in, generator=generator)
            targets = torch.cat([teacher(chunk).predictions for chunk in inputs.split(512)])
        self.train_inputs, self.eval_inputs = inputs[:num_train], inputs[num_train:]
        self.train_targets, self.eval_targets = targets[:num_train], targets[num_train:]

    @property
    def num_train_examples(self) -> int:
        return self.train_inputs.shape[0]

    def collate(self, indices) -> dict[str, torch.Tensor]:
        """Training examples ``indices`` -> ``{"inputs": (b, d_in), "targets": (b, d_out)}``."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"inputs": self.train_inputs[index], "targets": self.train_targets[index]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batch_size: int = 256, max_examples: int | None = None):
        """Mean squared error on the held-out examples: ``{"loss": ..., "n": ...}``."""
        count = self.eval_inputs.shape[0] if max_examples is None else max_examples
        count = min(count, self.eval_inputs.shape[0])
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            inputs = self.eval_inputs[start:stop].to(device)
            targets = self.eval_targets[start:stop].to(device)
            total += model(inputs=inputs, targets=targets).loss.item() * (stop - start)
        model.train(was_training)
        return {"loss": total / max(count, 1), "n": float(count)}
