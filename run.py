"""Hydra entry point: compose the config and run one job (or a sweep with -m).

python run.py                                   # the embedded default (offline, CPU)
python run.py experiment=smoke                  # a few-second smoke run
python run.py -m method=lora,stable_lora seed=0,1,2
torchrun --nproc_per_node=2 run.py ...          # one run on 2 processes (DDP)
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from stablelora.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from stablelora.train import run_job

    hydra_cfg = HydraConfig.get()
    return run_job(
        cfg,
        Path(hydra_cfg.runtime.output_dir),
        override_dirname=hydra_cfg.job.override_dirname,
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
    )


if __name__ == "__main__":
    main()
