"""Training loss and the main evaluation metric against step."""

from __future__ import annotations

from pathlib import Path

from analysis.collect import Collection
from analysis.plots.drawing import _history, _per_setting, register_plot


@register_plot
def loss(coll: Collection, out_dir: Path) -> list[Path]:
    """Training loss against step (mean over seeds, band: range)."""
    frame = _history(coll, lambda k: k == "train/loss")
    return _per_setting(
        out_dir, "loss", frame, "train loss", "Training loss (mean over seeds, band: range)"
    )


@register_plot(name="eval")
def eval_curves(coll: Collection, out_dir: Path) -> list[Path]:
    """Each run's main evaluation metric against step, accuracies in % (mean over seeds,
    band: range)."""
    from analysis.tables import metric_scale

    frame = _history(coll, lambda k: k.str.startswith("eval/"), ["main_metric"])
    frame = frame[frame["key"] == frame["main_metric"]]
    frame = frame.assign(value=frame["value"] * frame["main_metric"].map(metric_scale))
    metrics = ", ".join(sorted(frame["main_metric"].unique()))
    return _per_setting(
        out_dir,
        "eval",
        frame,
        "main metric (accuracy in %)",
        f"Evaluation ({metrics}; mean over seeds, band: range)",
    )
