"""Hydra entry point: compose the config and run one job (or a sweep with -m).

python run.py                                   # the embedded default (offline, CPU)
python run.py experiment=tiny_run               # one run of the tiny Llama, seconds
python run.py -m method=lora,stable_lora seed=0,1,2
torchrun --nproc_per_node=2 run.py ...          # one run on 2 processes (DDP)
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from stablelora.config.identity import register_resolvers
from stablelora.runner.sweep import default_num_threads

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from stablelora.runner.job import run_job

    hydra_cfg = HydraConfig.get()
    if cfg.trainer.num_threads is None:  # parallel jobs share the cores instead of each all
        with open_dict(cfg):
            cfg.trainer.num_threads = default_num_threads(hydra_cfg.launcher)
    return run_job(
        cfg,
        Path(hydra_cfg.runtime.output_dir),
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
    )


def check_cli(args: list[str]) -> None:
    """Before Hydra composes: a config group option that does not exist is one line and exit
    code 2 (Hydra: a long error, exit 1), a key given twice a warning; and Hydra's own copy of
    the config on a full disk is one line, not a traceback."""
    from stablelora.config.errors import CONFIG_ERROR_EXIT
    from stablelora.config.hydra_guards import check_command_line, guard_hydra_save

    try:
        for warning in check_command_line(args, Path(__file__).resolve().parent / "conf"):
            print(f"stablelora: {warning}", file=sys.stderr, flush=True)
    except ValueError as error:
        print(f"stablelora: config error: {error}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT)
    guard_hydra_save()


if __name__ == "__main__":
    check_cli(sys.argv[1:])
    main()
