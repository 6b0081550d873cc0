"""Width sweep of the feature-update decomposition on the toy teacher task
(the paper's Assumption 1 and its stable feature learning, arXiv 2603.05204).

Runs ``python run.py -m experiment=width_sweep`` (the runner's own training loop with the
:class:`stablelora.probes.gamma.FeatureProbe`): widths 128..4096, methods lora, rslora, loraplus and
stable_lora, seeds 0-2, lr fixed (``lr_width_exponent=0``) or scaled as n^-1/2 (``0.5``). Then
it gathers the runs' ``feat/*`` records into ``records.jsonl`` and fits the width exponents
with :mod:`analysis.width_fit` (table with 95% CIs, Assumption 1 check, plots).

Usage::

    python -m experiments.width_sweep                          # the full sweep (~10 min, 2 CPUs)
    python -m experiments.width_sweep --scale smoke           # 3 widths, 2 methods (seconds)
    python -m experiments.width_sweep hydra/launcher=joblib    # any extra Hydra overrides
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments.catalog import sweep_name
from stablelora.records.folder import CONFIG_FILE, RunFolder

ROOT = Path(__file__).resolve().parent.parent


def run_sweep(scale: str, output_root: Path, overrides: list[str]) -> Path:
    """Run the width sweep's multirun at ``scale`` through run.py; return the sweep directory."""
    command = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=width_sweep",
               f"scale={scale}", f"output_root={output_root}", *overrides]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    return output_root / "sweeps" / sweep_name("width_sweep", scale)


def width_records(sweep_dir: Path) -> Path:
    """One line per run of the sweep: its method, width, seed, lr mode and every logged
    ``feat/*`` step, the input format of :func:`analysis.width_fit.analyze`."""
    path = sweep_dir / "records.jsonl"
    with path.open("w") as out:
        for config_path in sorted(sweep_dir.glob(f"*/{CONFIG_FILE}")):
            run = RunFolder(config_path.parent)
            cfg, summary = run.stored_config, run.summary
            metrics = [row for row in run.metrics if any(k.startswith("feat/") for k in row)]
            record = {
                "method": cfg["method"]["name"],
                "width": cfg["model"]["width"],
                "seed": cfg["seed"],
                "lr_mode": "fixed" if float(cfg["lr_width_exponent"]) == 0 else "scaled",
                "lr": cfg["optim"]["lr"],
                "status": summary.get("status", "incomplete"),
                "run_dir": str(run.path),
                "metrics": metrics,
            }
            out.write(json.dumps(record) + "\n")
    return path


def main(argv=None) -> dict:
    """Run the sweep and the fit; return :func:`analysis.width_fit.analyze`'s result."""
    from analysis.width_fit import analyze

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("paper", "smoke"), default="paper",
                        help="smoke: 3 widths, 2 methods, 20 steps (CI)")  # fmt: skip
    parser.add_argument("--output-root", type=Path, default=ROOT / "outputs")
    parser.add_argument("--fit-steps", type=int, nargs="+", default=None,
                        help="steps to fit (default: 2 10 50 100 and the last)")  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    sweep_dir = run_sweep(args.scale, args.output_root.resolve(), overrides)
    result = analyze(width_records(sweep_dir), sweep_dir / "report", args.fit_steps)
    print(result["markdown"])
    print(f"\nsweep + fit: {time.perf_counter() - start:.0f}s; files: "
          + ", ".join(str(p) for p in result["files"]))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
