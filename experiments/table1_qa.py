"""Table 1: QA accuracy of every method on every model, per task and on average.

Four models x five QA tasks (each trained on separately) x five methods x three seeds, shown
beside the published averages; ``--seeds best`` follows the paper's best-of-3 protocol.

Usage::

    python experiments/table1_qa.py            # the paper's settings
    python experiments/table1_qa.py --smoke    # CI-sized (the _smoke preset)
    python experiments/table1_qa.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=table1_qa``
(``conf/experiment/table1_qa.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/table1_qa/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="table1_qa",
    description="Table 1: QA accuracy per task and on average, beside the published numbers.",
    tables=("table1", "table1_avg", "summary", "runs_not_completed"),
    plots=("loss", "eval"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
