"""Stop-rule ablation: Stable-LoRA with its stop rule and shrinking for the whole run.

Merged QA on the four models, beside the published ablation; also when each layer stopped.

Usage::

    python experiments/ablation_stop_rule.py            # the paper's settings
    python experiments/ablation_stop_rule.py --smoke    # CI-sized (the _smoke preset)
    python experiments/ablation_stop_rule.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=ablation_stop_rule``
(``conf/experiment/ablation_stop_rule.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/ablation_stop_rule/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="ablation_stop_rule",
    description="Stop-rule ablation of Stable-LoRA on merged QA.",
    tables=("ablation_stop_rule", "shrink_stops", "summary", "runs_not_completed"),
    plots=("figure2_norms", "shrink_stops", "eval"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
