"""The scale of A0 (x 0, 0.25, 1, 4) for AdamW and Stable-LoRA.

The paper's claim: a non-zero A0 breaks self-stability under AdamW (delta1 dominates delta2,
||A||_F stays at its initial size) and shrinking repairs it. Shown as accuracy and stability
tables by scale and as curves of delta1/delta2 and ||A||_F per scale.

Usage::

    python experiments/init_scale.py            # the paper's settings
    python experiments/init_scale.py --smoke    # CI-sized (the _smoke preset)
    python experiments/init_scale.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=init_scale``
(``conf/experiment/init_scale.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/init_scale/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="init_scale",
    description="The scale of A0: accuracy and self-stability, AdamW against Stable-LoRA.",
    tables=("init_scale", "init_scale_stability", "summary", "runs_not_completed"),
    plots=("init_scale", "figure2_norms", "delta_ratio"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
