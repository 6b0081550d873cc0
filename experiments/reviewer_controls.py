"""The reviewers' controls: AdamW with a large weight decay, and shrinking for N steps.

Variants (conf/experiment/controls/): LoRA, Stable-LoRA, Stable-LoRA shrinking on steps 1..N
only (no stop rule), AdamW with weight decay 5 on A, and on A and B (method adamw_large_wd).

Usage::

    python experiments/reviewer_controls.py            # the paper's settings
    python experiments/reviewer_controls.py --smoke    # CI-sized (the _smoke preset)
    python experiments/reviewer_controls.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=reviewer_controls``
(``conf/experiment/reviewer_controls.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/reviewer_controls/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="reviewer_controls",
    description="Reviewer controls beside LoRA and Stable-LoRA.",
    tables=("reviewer_controls", "shrink_stops", "summary", "runs_not_completed"),
    plots=("figure2_norms", "delta_ratio", "shrink_stops"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
