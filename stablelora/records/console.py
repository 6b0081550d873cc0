"""What a run prints: one-line messages, the result table at its end and the model's line."""

from __future__ import annotations

import math
import sys

from stablelora.records.summary import _number


def say(message: str) -> None:
    """One line to stderr, prefixed ``stablelora:``: what the runner tells the user."""
    print(f"stablelora: {message}", file=sys.stderr, flush=True)


def _finite_or_none(value):
    # JSON has no NaN or infinity: in metrics.jsonl a diverged loss is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_table(summary: dict) -> str:
    """A short Markdown table of a run's evaluation before and after training."""
    initial, final = summary.get("initial", {}), summary.get("final", {})
    keys = [k for k in dict.fromkeys([*initial, *final]) if not k.endswith("/n")]
    lines = [
        f"run: {summary.get('method')} on {summary.get('task')} with {summary.get('model')}, "
        f"seed {summary.get('seed')}: {summary['status']} after {summary.get('steps')} steps"
        + (f" ({summary['error']})" if summary.get("error") else ""),
        "",
        *([model_line(summary["base_model"]), ""] if summary.get("base_model") else []),
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in keys:
        before, after = initial.get(key), final.get(key)
        lines.append(f"| {key} | {_fmt(before)} | {_fmt(after)} |")
    loss = _number(summary.get("train_loss_final"))
    if loss is not None:
        lines.append(f"| train/loss (last step) | | {loss:.4f} |")
    counts = summary.get("shrink_layers")
    if counts:
        median = counts.get("median_stop_step")
        lines += [
            "",
            f"shrink: {counts['stopped']} of {counts['layers']} LoRA layers stopped shrinking"
            + (f" (median stop step {median:g})" if median is not None else "")
            + f", {counts['shrinking']} still shrinking"
            + (
                " (the stop rule never fired: A was shrunk on every step)"
                if not counts["stopped"]
                else ""
            ),
        ]
    return "\n".join(lines)


def model_line(record: dict) -> str:
    """One line saying what model was trained, from a summary's ``base_model``:
    ``model: llama, 30 layers, hidden 576, 9 heads (3 KV), vocab 49152; 134.5M parameters,
    460.8K trainable; 4-bit Q4_1 GGUF, dequantized to float32``."""

    def millions(count) -> str:
        for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if count is not None and count >= scale:
                return f"{count / scale:.4g}{unit}"
        return str(count if count is not None else "?")

    heads = record.get("num_attention_heads")
    kv = record.get("num_key_value_heads")
    parts = [
        str(record.get("model_type") or "?"),
        f"{record.get('num_hidden_layers')} layers",
        f"hidden {record.get('hidden_size')}",
        *([f"{heads} heads" + (f" ({kv} KV)" if kv not in (None, heads) else "")] if heads else []),
        *([f"vocab {record['vocab_size']}"] if record.get("vocab_size") else []),
    ]
    return (
        f"model: {', '.join(parts)}; {millions(record.get('parameters'))} parameters, "
        f"{millions(record.get('trainable_parameters'))} trainable"
        + (f"; {record['weights']}" if record.get("weights") else "")
    )


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
