"""The paper's figures and the diagnostic curves, from a :class:`~analysis.collect.Collection`.

One style for every figure (:data:`~analysis.plots.drawing.STYLE`, a fixed colour per
method), matplotlib's Agg backend, each figure saved as ``<name>.png`` and ``<name>.pdf``.
Each builder returns the paths it wrote, or ``[]`` when the records lack what it draws:

================== =====================================================================
``figure2_norms``  Figure 2: ||A||_F and ||B||_F against step, per method: mean over seeds
                   and layers, band = their range, a tick at each layer's stop step
``deltas``         the feature-update magnitudes delta1, delta2, delta3, dY against step
``delta_ratio``    delta1/delta2 against step (about 1 when both factors learn)
``shrink_stops``   the step at which each layer stopped shrinking
``loss``           training loss against step
``eval``           the main evaluation metric against step
``init_scale``     delta1/delta2 and ||A||_F against step, one curve per scale of A0
``lr_sweep``       a tuned study's selection curve: each method's score against lr, the pick
                   ringed
``gamma_width``    the feature updates' RMS against model width with the fitted exponents
                   (:mod:`analysis.width_fit`)
================== =====================================================================

Curves are means over seeds with the range over seeds (and layers) as a band. A plot is a
function registered by ``@register_plot`` (:mod:`analysis.plots.drawing`) in any module of
this package (this package imports them all): :mod:`~analysis.plots.norms`,
:mod:`~analysis.plots.deltas`, :mod:`~analysis.plots.curves`, :mod:`~analysis.plots.selection`,
:mod:`~analysis.plots.width`...
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from analysis.collect import Collection
from analysis.discovery import discover
from analysis.plots.drawing import PLOTS, label_colors, register_plot, save_figure

__all__ = ["PLOTS", "build_plots", "label_colors", "register_plot", "save_figure"]

#: The report's order of the plots; a plot not listed comes after them (by module and name).
REPORT_ORDER = (
    "figure2_norms",
    "deltas",
    "delta_ratio",
    "shrink_stops",
    "loss",
    "eval",
    "init_scale",
    "lr_sweep",
)


def _rank(name: str, draw) -> tuple:
    """The report's order: by :data:`REPORT_ORDER`, then by module and name."""
    known = REPORT_ORDER.index(name) if name in REPORT_ORDER else len(REPORT_ORDER)
    return known, draw.__module__, name


discover(__name__, __path__, PLOTS, _rank)  # every module of this package, then the order


def build_plots(
    coll: Collection, out_dir: str | Path, names: Iterable[str] | None = None
) -> list[Path]:
    """Draw every plot in ``names`` (default: all) that the records support into ``out_dir``."""
    names = list(PLOTS) if names is None else list(names)
    unknown = sorted(set(names) - set(PLOTS))
    if unknown:
        raise ValueError(f"unknown plots {unknown}: choose from {list(PLOTS)}.")
    paths = []
    for name in names:
        paths += PLOTS[name](coll, Path(out_dir))
    return paths
