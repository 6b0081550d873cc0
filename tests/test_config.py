"""Every config group composes with Hydra's compose API and passes validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stablelora.config import register_resolvers

CONF = Path(__file__).resolve().parent.parent / "conf"
register_resolvers()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_is_the_embedded_offline_job():
    cfg = compose_config()
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf"
    assert cfg.task.name == "bbc_news"
    assert cfg.method.name == "stable_lora" and cfg.method.shrink_ratio == 5e-4
    assert cfg.method.stop_rule == "norm" and cfg.method.rank == 8
    assert list(cfg.method.target_modules) == ["q_proj", "v_proj"]
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize(
    "group",
    ["model", "task", "method", "optim", "trainer", "logger", "probe"],
)
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    needs = {"task=toy_teacher": ["model=toy_width"]}  # the teacher has the model's width
    for option in options:
        if option.startswith("_"):
            continue
        choice = f"{group}={option}"
        cfg = compose_config([choice, *needs.get(choice, [])])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_contract_names_exist():
    for group, names in {
        "model": ["tiny_llama", "tiny_qwen2", "smollm2_135m", "qwen2_0.5b", "qwen2_1.5b",
                  "llama3.2_1b", "llama3.2_3b", "llama3.1_8b"],
        "method": ["lora", "rslora", "loraplus", "stable_lora"],
        "task": ["hellaswag", "siqa", "obqa", "arc_easy", "arc_challenge", "merged_qa",
                 "metamath_gsm8k", "bbc_news", "arithmetic"],
        "experiment": ["smoke"],
    }.items():  # fmt: skip
        assert set(names) <= set(group_options(group)), group


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name


def test_methods_differ_only_where_they_should():
    lora = compose_config(["method=lora"]).method
    for name, expected in {
        "rslora": {"name": "rslora", "optimizer": "rslora", "scaling": "rslora"},
        "loraplus": {"name": "loraplus", "optimizer": "loraplus", "loraplus_lr_ratio": 16},
        "stable_lora": {"name": "stable_lora", "optimizer": "stable_lora", "shrink_ratio": 5e-4},
    }.items():
        method = compose_config([f"method={name}"]).method
        changed = {k: method[k] for k in method if method[k] != lora[k]}
        assert changed == expected, name


def test_validation_accepts_every_composed_default():
    from stablelora.train import check_config

    for method in ("lora", "rslora", "loraplus", "stable_lora"):
        check_config(compose_config([f"method={method}", "model=tiny_llama"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.rank=0", "method.rank must be a positive integer"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("optim.lr=-1e-4", "optim.lr must be positive"),
        ("method.shrink_ratio=1.0", r"method.shrink_ratio must be in \[0, 1\)"),
        ("method.shrink_ratio=-0.1", r"method.shrink_ratio must be in \[0, 1\)"),
        ("method.stop_rule=sometimes", "Unknown stop_rule"),
        ("method.optimizer=adam", "method.optimizer must be one of .*got method.optimizer=adam"),
        ("method.scaling=sqrt", "method.scaling must be one of"),
        ("trainer.max_steps=0", "trainer.max_steps must be positive"),
        ("model=llama3.2_1b", "not available offline.*model.path="),
        ("task=arc_easy", "task.data_dir"),
    ],
)
def test_bad_values_are_one_clear_line(override, message, monkeypatch):
    from stablelora.train import ConfigError, check_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message) as error:
        check_config(compose_config(["model=tiny_llama", override]))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])  # fmt: skip
def test_launchers_compose_with_the_local_example(launcher, target, tmp_path):
    import shutil

    # The documented cluster settings (conf/local/slurm.example.yaml) apply on top of submitit.
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    if launcher == "submitit_slurm":
        shutil.copy(conf / "local" / "slurm.example.yaml", conf / "local" / "default.yaml")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.partition == "gpu" and cfg.logger.mode == "online"
