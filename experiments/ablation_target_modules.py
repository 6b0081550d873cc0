"""Target-module ablation: q,v / q,k,v,o / all seven projections, AdamW and Stable-LoRA.

Llama-3.2-3B on merged QA, beside the published ablation.

Usage::

    python experiments/ablation_target_modules.py            # the paper's settings
    python experiments/ablation_target_modules.py --smoke    # CI-sized (the _smoke preset)
    python experiments/ablation_target_modules.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=ablation_target_modules``
(``conf/experiment/ablation_target_modules.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/ablation_target_modules/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="ablation_target_modules",
    description="Target-module ablation on Llama-3.2-3B, merged QA.",
    tables=("ablation_target_modules", "summary", "runs_not_completed"),
    plots=("loss", "eval"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
