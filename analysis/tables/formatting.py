"""A :class:`Table` (Markdown, LaTeX booktabs, CSV) and the cell texts and layouts the
artefacts share."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.tables.ordering import sort_frame

DASH = "—"


#: Significant digits of the floats in a written CSV: a fit's last digits move with the
#: numpy/BLAS build and thread count (1 ulp seen), which must not change the file's bytes.
CSV_DIGITS = 12


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV with every float rounded to :data:`CSV_DIGITS` significant digits, so
    that a rebuilt report is byte-identical to the committed one."""

    def rounded(value):
        return float(f"{value:.{CSV_DIGITS}g}") if isinstance(value, float) else value

    frame.apply(lambda column: column.map(rounded)).to_csv(path, index=False)


@dataclass
class Table:
    """A table ready to print and write.

    ``display`` holds the strings shown in Markdown and LaTeX (its first ``key_columns``
    columns are row labels); ``data`` holds the numbers written to CSV; ``notes`` are printed
    under the table.
    """

    name: str
    title: str
    display: pd.DataFrame
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    key_columns: int = 1

    def markdown(self) -> str:
        """The table as GitHub Markdown, title and notes included."""
        columns = [str(c) for c in self.display.columns]
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(columns) + " |",
            "|"
            + "".join(":---|" if i < self.key_columns else "---:|" for i in range(len(columns))),
        ]
        for row in self.display.itertuples(index=False):
            lines.append("| " + " | ".join(_md_escape(str(v)) for v in row) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """The table as a LaTeX ``table`` float with a booktabs ``tabular``."""
        columns = list(self.display.columns)
        spec = "l" * self.key_columns + "r" * (len(columns) - self.key_columns)
        lines = [
            "% requires \\usepackage{booktabs}",
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{{latex_escape(self.title)}}}",
            f"\\label{{tab:{self.name}}}",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            " & ".join(latex_escape(str(c)) for c in columns) + " \\\\",
            "\\midrule",
        ]
        for row in self.display.itertuples(index=False):
            lines.append(" & ".join(latex_escape(str(v)) for v in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.notes:
            notes = " ".join(latex_escape(n) for n in self.notes)
            lines.append(f"\\par\\smallskip{{\\footnotesize {notes}}}")
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")]
        paths[0].write_text(self.markdown())
        paths[1].write_text(self.latex())
        write_csv(self.data, paths[2])
        return paths


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "—": "--",
    "·": r"$\cdot$",
    "≥": r"$\geq$",
    "→": r"$\to$",
    "λ": r"$\lambda$",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX text (specials escaped, ± and Δ as math)."""
    return _LATEX_RE.sub(lambda m: LATEX_SPECIALS[m.group(0)], text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def num_text(value, digits: int = 2, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return DASH
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def cell_text(stats, mode: str, digits: int = 2, fmt: Callable[[float], str] | None = None) -> str:
    """One aggregated cell: ``61.94 ± 0.52 (n=3)`` (mean) or ``62.40 (best of 3)`` (best);
    ``n=2/3`` when a run of the cell did not complete; the statuses when none did. ``fmt``
    formats the value instead of ``digits`` (and then no spread is shown)."""
    n, runs = int(stats["n"]), int(stats["runs"])
    if runs == 0:
        return DASH
    if n == 0:
        return f"{stats['statuses'] or 'no result'} (0/{runs})"
    count = f"{n}" if n == runs else f"{n}/{runs}"
    if fmt is not None:
        return f"{fmt(stats['value'])} (n={count})"
    if mode == "best":
        return f"{num_text(stats['value'], digits)} (best of {count})"
    spread = f" ± {num_text(stats['std'], digits)}" if n > 1 else ""
    return f"{num_text(stats['value'], digits)}{spread} (n={count})"


def grouped(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.DataFrame]:
    """``{key tuple: rows}`` of ``frame`` grouped on ``keys`` (missing keys as a dash)."""
    filled = frame.assign(
        **{k: frame[k].astype(object).where(frame[k].notna(), DASH) for k in keys}
    )
    return {key: group for key, group in filled.groupby(keys, sort=False)}


def group_key(row: dict, keys: list[str]) -> tuple:
    return tuple(DASH if pd.isna(row[k]) else row[k] for k in keys)


def pivot_with_paper(
    cells: pd.DataFrame,
    row_keys: list[str],
    column: str,
    columns: list,
    mode: str,
    paper: Callable[[dict, object], float],
    column_title: Callable[[object], str] = str,
    fmt: Callable[[float], str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells -> (display, data): a row per ``row_keys`` value with a column per ``column``
    value; where the paper has numbers for a row, a ``paper`` and a ``Δ`` row follow it."""
    display_rows, data_rows = [], []
    any_paper = False
    groups = grouped(cells, row_keys)
    for row in sort_frame(cells[row_keys].drop_duplicates(), row_keys).to_dict("records"):
        mine = groups[group_key(row, row_keys)].set_index(column)
        ours = {"source": "ours", **{k: str(v) for k, v in row.items()}}
        papers = {"source": "paper", **{k: "" for k in row}}
        diffs = {"source": "Δ", **{k: "" for k in row}}
        has_paper = False
        for value in columns:
            stats = mine.loc[value] if value in mine.index else None
            title = column_title(value)
            ours[title] = cell_text(stats, mode, fmt=fmt) if stats is not None else DASH
            reference = paper(row, value)
            ours_value = stats["value"] if stats is not None else math.nan
            papers[title], diffs[title] = (
                num_text(reference),
                num_text(ours_value - reference, signed=True),
            )
            has_paper |= bool(np.isfinite(reference))
            data_rows.append(
                {
                    **row,
                    column: value,
                    "value": ours_value,
                    **({} if stats is None else {k: stats[k] for k in ("std", "n", "runs")}),
                    "paper": reference,
                    "diff": ours_value - reference,
                }
            )
        display_rows += [ours, papers, diffs] if has_paper else [ours]
        any_paper |= has_paper
    display = pd.DataFrame(display_rows)
    order = [*row_keys, "source", *[column_title(v) for v in columns]]
    display = display[order] if any_paper else display[[c for c in order if c != "source"]]
    return display, pd.DataFrame(data_rows)
