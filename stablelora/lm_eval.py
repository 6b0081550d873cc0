"""lm-evaluation-harness on a run's adapter.

    python -m stablelora.lm_eval outputs/runs/<run> --tasks arc_easy,hellaswag
    python -m stablelora.lm_eval <run> --tasks my_task --include-path my_tasks/ --limit 100

Builds lm-eval's ``HFLM`` around the run's base model (``model`` of its ``config.yaml``: the
dequantised SmolLM2 folder the project caches, a Hub id or local folder, or a random-init
model rebuilt from the run's seed exactly as training built it) with the run's ``adapter/``
loaded by peft, runs ``lm_eval.simple_evaluate`` and writes its results to
``<run>/lm_eval/<tasks>.json`` beside the run's records (``lm_eval.utils.make_table`` is
printed). Needs the ``lm_eval`` extra: ``pip install -e .[lm_eval]``.

``--include-path`` adds a folder of task YAMLs, e.g. an offline task over local files
(``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: ...}}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stablelora.config.errors import CONFIG_ERROR_EXIT
from stablelora.records.layers import RecordsError
from stablelora.records.summary import read_summary


class LmEvalError(ValueError):
    """A usage error (no such run, no adapter, unknown task, a Hub task offline): one line,
    exit code 2."""


#: What to do about a damaged ``config.yaml``.
CONFIG_FIX = "restore the run's config.yaml (Hydra's copy is .hydra/config.yaml), or rerun the run"


def read_run_config(run_dir: Path, required: tuple[str, ...] = ()):
    """The run's ``config.yaml`` as a DictConfig; :class:`RecordsError` (one line) when it is
    not a YAML mapping, or lacks a ``required`` key."""
    import yaml
    from omegaconf import OmegaConf

    from stablelora.records.folder import CONFIG_FILE, load_yaml

    path = run_dir / CONFIG_FILE
    try:
        tree = load_yaml(path)
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: not UTF-8
        reason = type(error).__name__
        raise RecordsError(f"{path} cannot be read ({reason}): {CONFIG_FIX}") from None
    if not isinstance(tree, dict):
        kind = "empty file" if tree is None else type(tree).__name__
        raise RecordsError(f"{path} is a YAML {kind}, not a run's config: {CONFIG_FIX}")
    missing = [key for key in required if key not in tree]
    if missing:
        raise RecordsError(f"{path} has no {missing[0]!r}: {CONFIG_FIX}")
    # OmegaConf's own loader for the values (it reads 1e-4 as a float, YAML 1.1 a string)
    return OmegaConf.load(path)


def load_run_model(run_dir: Path, device: str = "cpu"):
    """``(PeftModel, tokenizer, config)`` of a completed run, in eval mode on ``device``;
    :class:`RecordsError` (one line) when its config or adapter is damaged."""
    import torch
    from peft import PeftModel
    from safetensors import SafetensorError

    from stablelora.models import load_model
    from stablelora.runner.setup import seed_everything

    cfg = read_run_config(run_dir, required=("model", "seed"))  # what the base is rebuilt from
    # A random-init base (model.source=config) is the one train() built right after seeding.
    seed_everything(cfg.seed, deterministic=False)
    base, tokenizer = load_model(cfg.model)
    adapter = run_dir / "adapter"
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except SafetensorError as error:  # cut short (a full disk, a partial copy) or not a tensor file
        raise RecordsError(
            f"{adapter / 'adapter_model.safetensors'} cannot be read ({error}): delete "
            f"{adapter} and rerun the run's command to train it again, or evaluate another run"
        ) from None
    return model.to(torch.device(device)).eval(), tokenizer, cfg


def check_run(run_dir: Path) -> None:
    """A usage error unless ``run_dir`` is a run folder with an adapter to evaluate; the
    message says what to do for the run's status (a diverged run never gets one)."""
    if not (run_dir / "config.yaml").is_file():
        raise LmEvalError(f"{run_dir} is not a run folder (no config.yaml): pass a run's folder.")
    read_run_config(run_dir)
    if (run_dir / "adapter").is_dir():
        return
    summary = read_summary(run_dir)
    if summary.get("status") == "diverged":  # a result: rerunning it does nothing
        raise LmEvalError(
            f"{run_dir} diverged ({summary.get('error') or 'a non-finite loss'}): it has no "
            "usable adapter, and rerunning it changes nothing; evaluate another run (e.g. one "
            "at a smaller optim.lr)."
        )
    raise LmEvalError(
        f"{run_dir} has no adapter/ (only a completed run saves one): finish the run by "
        "rerunning its command, then evaluate it."
    )


def task_manager(include_path: str | None, tasks: list[str]):
    """lm-eval's TaskManager (with ``include_path``), after checking that every task exists."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError("lm-eval is not installed: pip install -e .[lm_eval]") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise LmEvalError(f"--include-path {include_path} is not a folder of task YAMLs.")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise LmEvalError(
            f"unknown lm-eval task(s) {unknown}: see `lm-eval ls tasks`, or add a folder of "
            "task YAMLs with --include-path."
        )
    return manager


def evaluate_run(
    run_dir: str | Path,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    device: str = "auto",
    log_samples: bool = False,
) -> tuple[dict, Path]:
    """Run lm-eval's ``tasks`` on the run's adapter; return lm-eval's results and the file
    they were written to (``<run>/lm_eval/<tasks>.json``; with ``log_samples`` the per-example
    requests and responses too, under ``samples``)."""
    import torch

    run_dir = Path(run_dir)
    if not tasks:
        raise LmEvalError("no tasks: pass --tasks arc_easy,hellaswag (lm-eval task names).")
    check_run(run_dir)
    manager = task_manager(include_path, tasks)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    model, tokenizer, _ = load_run_model(run_dir, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
        )
    except ConnectionError as error:  # a task's dataset is on the Hub, which cannot be reached
        raise LmEvalError(
            f"the data of lm-eval task(s) {tasks} cannot be downloaded ({error}): run once with "
            "network access (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE unset) to cache them, or give "
            "--include-path a folder with a task YAML over local files."
        ) from None
    if results is None:  # a non-zero rank under accelerate
        return {}, run_dir / "lm_eval"
    path = run_dir / "lm_eval" / f"{'_'.join(tasks)}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
    return results, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stablelora.lm_eval",
        description="lm-evaluation-harness on a run's adapter.",
    )
    parser.add_argument("run_dir", help="a completed run folder (outputs/runs/<run>)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--log-samples", action="store_true", help="keep per-example outputs")
    args = parser.parse_args(argv)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    try:
        results, path = evaluate_run(
            args.run_dir,
            [task for task in args.tasks.split(",") if task],
            batch_size=args.batch_size,
            limit=limit,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            device=args.device,
            log_samples=args.log_samples,
        )
    except LmEvalError as error:
        print(f"stablelora.lm_eval: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    except RecordsError as error:  # the run's records are damaged: not a usage error
        sys.exit(f"stablelora.lm_eval: {error}")  # one line on stderr, exit code 1
    if results:
        from lm_eval.utils import make_table

        print(make_table(results))
        print(f"lm-eval results: {path}")


if __name__ == "__main__":
    main()
