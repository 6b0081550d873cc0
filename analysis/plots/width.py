"""The width exponents' figures (``gamma_width``), drawn by :mod:`analysis.width_fit` from
the fits of the ``gamma_width`` table (:mod:`analysis.tables.width`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from analysis.collect import Collection
from analysis.plots.drawing import register_plot


@register_plot
def gamma_width(coll: Collection, out_dir: Path) -> list[Path]:
    """log RMS of each feature update against log width with the fitted slopes. For a width
    sweep's ``records.jsonl`` beside the runs: :func:`analysis.width_fit.analyze`'s report in
    ``width_sweep/`` next to ``out_dir`` (``width_sweep_<i>/`` for several), its figures
    copied here as ``gamma_width_fit`` and ``gamma_exponents_vs_step``; else, for runs of
    several widths, ``gamma_width``."""
    from analysis import width_fit
    from analysis.tables.width import runs_fits, suffixes, sweep_records

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sweep_records(coll.roots)
    written = []
    for path, suffix in zip(records, suffixes(records)):
        result = width_fit.analyze(path, out_dir.parent / f"width_sweep{suffix}")
        for figure in result["files"]:
            if figure.suffix in (".png", ".pdf"):
                stem = figure.name.removesuffix(figure.suffix)
                target = (out_dir / f"gamma_{stem}{suffix}").with_suffix(figure.suffix)
                shutil.copyfile(figure, target)
                written.append(target)
    if records:
        return written
    fitted = runs_fits(coll)
    if fitted is None:
        return []
    table, steps, fits = fitted
    return width_fit.plot_magnitudes(table, fits, steps[-1], out_dir / "gamma_width")
