"""``python -m stablelora.contamination``: the train/eval overlap check users run.

``python -m stablelora.contamination [OVERRIDES]`` loads the task of the config that
``run.py`` would compose with those Hydra overrides, as its run would (split rule, seed,
limits), and prints per eval set how many items overlap training or the other held-out split
(exact / near), the repeats and what the ``content`` rule removed. ``--run RUN_DIR...`` does
the same from recorded runs' ``config.yaml`` (a config without ``task.split_rule`` reads as
``legacy``), ``--write`` leaves each run's ``contamination.json``, ``--ids`` lists the items.
A config the check cannot read ends with one line on stderr and exit 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stablelora.contamination import (
    CONTAMINATION_FILE,
    LEGACY,
    excluded_ids,
    markdown_table,
    overlap_rows,
    record_overlap,
    split_rule_of,
)


def check_config(cfg: Any) -> dict[str, dict[str, Any]]:
    """The overlap records of a composed (or recorded) config's task, as its run would make
    them; raises ValueError (one line) for a config the check cannot read or cover."""
    from stablelora.tasks import check_task_config, task_splits

    task_cfg = cfg["task"]
    if task_cfg.get("split_rule") is None:  # a recorded config from before the key
        task_cfg = {**task_cfg, "split_rule": LEGACY}
    check_task_config(task_cfg)
    splits = task_splits(task_cfg, seed=int(cfg.get("seed") or 0))
    if splits is None:
        raise ValueError(
            f"task {task_cfg['name']}: the overlap check does not cover family "
            f"{task_cfg['family']} (multiple choice and maths only)"
        )
    return {name: split.overlap for name, split in splits.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stablelora.contamination [OVERRIDES] | --run RUN_DIR... [--write]``."""
    import argparse
    import sys

    from stablelora.records.folder import CONFIG_FILE, load_yaml

    parser = argparse.ArgumentParser(
        prog="python -m stablelora.contamination",
        description="Train/eval overlap of a task's splits (exact and near duplicates of "
        "normalised text), as a run with these Hydra overrides would load them, or as the "
        "recorded runs did (--run).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    parser.add_argument("--run", nargs="+", type=Path, default=(), help="run folders")
    parser.add_argument(
        "--write", action="store_true", help="with --run: write each run's contamination.json"
    )
    parser.add_argument("--ids", action="store_true", help="list the overlapping items' ids")
    args = parser.parse_args(argv)
    configs: list[tuple[str, Any]] = []
    try:
        if args.run:
            for run_dir in args.run:
                path = run_dir / CONFIG_FILE
                if not path.is_file():
                    raise ValueError(f"{path} does not exist: give a run folder")
                configs.append((str(run_dir), load_yaml(path)))
        else:
            configs.append(("config", _compose(args.overrides)))
        for name, cfg in configs:
            overlap = check_config(cfg)
            rule = split_rule_of(cfg["task"])
            print(f"## {name}: task {cfg['task']['name']}, split rule {rule}\n")
            print(markdown_table(overlap_rows(overlap)) + "\n")
            if args.ids:
                for task, ids in excluded_ids({"tasks": overlap}).items():
                    print(f"{task}: {', '.join(sorted(ids)) or '-'}")
            if args.write and args.run:
                print(f"wrote {record_path(Path(name), cfg['task'], overlap)}")
    except ValueError as error:
        print(f"stablelora.contamination: {error}", file=sys.stderr)
        return 2
    return 0


def record_path(run_dir: Path, task_cfg: Any, overlap: Mapping[str, Any]) -> Path:
    """Write a run's record as its run would have (:func:`record_overlap`); its path."""
    record_overlap(run_dir, task_cfg, overlap)
    return run_dir / CONTAMINATION_FILE


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stablelora.config.identity import register_resolvers

    register_resolvers()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


if __name__ == "__main__":
    raise SystemExit(main())
