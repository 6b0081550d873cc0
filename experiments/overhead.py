"""Overhead: training time and peak memory of every method relative to LoRA (AdamW).

Qwen2-0.5B on HellaSwag with the feature probes off, beside the published overheads.

Usage::

    python experiments/overhead.py            # the paper's settings
    python experiments/overhead.py --smoke    # CI-sized (the _smoke preset)
    python experiments/overhead.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=overhead``
(``conf/experiment/overhead.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/overhead/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="overhead",
    description="Time and memory overhead relative to LoRA.",
    tables=("overhead", "summary", "runs_not_completed"),
    plots=("loss",),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
