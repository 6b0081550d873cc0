"""What the feature probe measures, shared by the probe (:mod:`stablelora.probes.gamma`), the run
records (:mod:`stablelora.records.layers`) and the analysis: the quantities' names, in the
probe's order, and the gamma value of a magnitude. Numpy only, no torch."""

from __future__ import annotations

import numpy as np

#: The terms of one step's LoRA output change, ``dY = delta1 + delta2 + delta3``.
DECOMPOSITION = ("delta1", "delta2", "delta3", "dY")
#: Every quantity the probe measures per layer, in its order (the records' column order).
QUANTITIES = (*DECOMPOSITION, "gAZ", "AZ", "Z")


def gamma_values(magnitudes, widths) -> np.ndarray:
    """``log(magnitude) / log(width)`` elementwise, in float64: -inf for a zero magnitude, NaN
    for a negative or NaN magnitude or a width <= 1. The probe's per-layer gamma values are
    computed with this function, so the analysis recomputes them bit for bit.

    Args:
        magnitudes: RMS values, any shape.
        widths: input widths n, broadcasting against ``magnitudes``.
    """
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log(magnitudes) / np.log(widths)
    return np.where(widths > 1, values, np.nan)


def gamma_value(magnitude: float, width: int) -> float:
    """``log(magnitude) / log(width)``: -inf for a zero magnitude, nan for width <= 1 (one
    value of :func:`gamma_values`)."""
    return float(gamma_values(magnitude, width))
