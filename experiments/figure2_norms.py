"""Figure 2: ||A||_F and ||B||_F against step for AdamW and Stable-LoRA.

Also the feature-update magnitudes (delta1, delta2, delta3, dY), their ratio delta1/delta2
and the step at which each layer stopped shrinking.

Usage::

    python experiments/figure2_norms.py            # the paper's settings
    python experiments/figure2_norms.py --smoke    # CI-sized (the _smoke preset)
    python experiments/figure2_norms.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=figure2_norms``
(``conf/experiment/figure2_norms.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/figure2_norms/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="figure2_norms",
    description="Figure 2: LoRA factor norms against step, with the feature-update magnitudes.",
    tables=("shrink_stops", "summary", "runs_not_completed"),
    plots=("figure2_norms", "deltas", "delta_ratio", "shrink_stops"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
