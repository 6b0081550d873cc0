"""GSM8K accuracy after training on MetaMathQA, by step budget (1000, 2000, 5000).

One 5000-step run per (model, method, seed), evaluated every 1000 steps; the paper's one
recovered cell (Llama-3.2-3B at 5000 steps) is shown beside ours.

Usage::

    python experiments/gsm8k.py            # the paper's settings
    python experiments/gsm8k.py --smoke    # CI-sized (the _smoke preset)
    python experiments/gsm8k.py --output-root /scratch --seeds best seed=0

Runs ``python run.py -m experiment=gsm8k``
(``conf/experiment/gsm8k.yaml``), then ``python -m analysis.report`` on its sweep:
tables and plots in ``<output-root>/sweeps/gsm8k/report/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import Experiment, main  # noqa: E402

EXPERIMENT = Experiment(
    name="gsm8k",
    description="GSM8K accuracy by step budget, AdamW against Stable-LoRA.",
    tables=("gsm8k", "summary", "runs_not_completed"),
    plots=("eval", "loss"),
)

if __name__ == "__main__":
    sys.exit(main(EXPERIMENT))
