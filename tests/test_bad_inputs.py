"""Bad inputs that used to reach a traceback or Hydra's exit code 1: each is one line, exit code
2 for a usage error, found before the model loads, and leaves no run folder behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from helpers import CONF, ROOT, SMOKE, compose_config, run_cli

from stablelora.config.groups import group_options
from stablelora.config.hydra_guards import check_command_line
from stablelora.runner.job import run_job

FIXTURE = ROOT / "tests" / "fixtures" / "llm_adapters"


# ---------------------------------------------------------------------------- data files
@pytest.mark.parametrize(
    "damage,message",
    [
        ('[{"instruction": "q", "answer": "true"}, {"instruc', r"cannot read .*boolq/test.json"),
        ('[{"instruction": "q"}]', r"row 0 of .*boolq/test.json has no 'answer'"),
        (
            '[{"instruction": null, "answer": "true"}]',
            r"row 0 of .*boolq/test.json: 'instruction' is null, not text: fix the row",
        ),
    ],
)
def test_a_malformed_eval_file_is_a_config_error_before_the_model_loads(
    tmp_path, monkeypatch, capsys, damage, message
):
    import stablelora.models

    data = tmp_path / "LLM-Adapters"
    shutil.copytree(FIXTURE, data)
    (data / "dataset" / "boolq" / "test.json").write_text(damage)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(stablelora.models, "load_model", no_model)
    cfg = compose_config(["model=tiny_llama", "task=commonsense8", f"task.data_dir={data}"])
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg, run_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error" in err[0]
    assert __import__("re").search(message, err[0]), err[0]
    assert not run_dir.exists()  # a config error leaves nothing behind


def test_a_config_error_removes_only_a_folder_that_holds_no_records(tmp_path, capsys):
    bad = compose_config(SMOKE + ["adapter.rank=0"])
    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)  # what Hydra writes before the job
    (fresh / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (fresh / "run.log").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_job(bad, fresh)
    assert exit_info.value.code == 2 and not fresh.exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(SystemExit):
        run_job(bad, used)
    assert json.loads((used / "summary.json").read_text()) == {"status": "interrupted"}


# ---------------------------------------------------------------------------- command line
def test_a_group_option_that_does_not_exist_is_one_line_naming_the_options():
    assert "_base" not in group_options(CONF, "task") and "bbc_news" in group_options(CONF, "task")
    assert "table1" in group_options(CONF, "experiment")
    assert "_tuned" not in group_options(CONF, "experiment")
    assert "table1/cpu" not in group_options(CONF, "experiment")  # a scale's settings of table1
    assert group_options(CONF, "scale") == ["cpu", "paper", "smoke"]
    for args in (["model=nope"], ["-m", "task=bbc_news,_base"], ["experiment=cpu/table1"],
                 ["scale=gpu"]):  # fmt: skip
        with pytest.raises(
            ValueError, match=r"is not an option of conf/\w+/( \(a shared base\))?; choose one of"
        ) as e:
            check_command_line(args, CONF)
        assert "_base" not in str(e.value).split("choose one of")[1]
    ok = ["-m", "hydra/launcher=joblib", "method=lora,stable_lora", "optim.lr=1e-3", "seed=1"]
    assert (
        check_command_line([*ok, "experiment=table1", "scale=cpu", "+task.x=1", "~logger"], CONF)
        == []
    )
    assert check_command_line(["--config-name", "model=nope", "seed=2"], CONF) == []
    (warning,) = check_command_line(["optim.lr=1e-3", "seed=1", "optim.lr=3e-4"], CONF)
    assert "optim.lr is given twice" in warning and "takes the last: optim.lr=3e-4" in warning


@pytest.mark.slow
@pytest.mark.parametrize("override", ["model=nope", "task=_base"])
def test_cli_unknown_group_option_is_one_line_exit_2_and_no_folder(tmp_path, override):
    result = run_cli("run.py", *SMOKE, override, f"output_root={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an option of conf/" in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_hydra_saving_its_config_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import hydra.core.utils

    from stablelora.config import hydra_guards

    hydra_guards.guard_hydra_save()
    hydra_guards.guard_hydra_save()  # idempotent
    assert hydra.core.utils._save_config is hydra_guards.save_hydra_config_or_exit

    def full_disk(cfg, filename, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hydra_guards, "_hydra_save_config", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        hydra.core.utils._save_config({}, "config.yaml", Path(tmp_path))
    message = exit_info.value.code
    assert message.startswith("stablelora: no space left on device (") and "\n" not in message

    def other_error(cfg, filename, output_dir):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(hydra_guards, "_hydra_save_config", other_error)
    with pytest.raises(PermissionError):
        hydra.core.utils._save_config({}, "config.yaml", Path(tmp_path))


def test_an_empty_group_option_or_a_plus_on_a_default_group_is_one_line():
    with pytest.raises(ValueError, match=r"^model= picks no option of conf/model/; choose one"):
        check_command_line(["model="], CONF)
    with pytest.raises(ValueError, match=r"variant= picks no option.* \(or variant=null\)\."):
        check_command_line(["variant="], CONF)
    with pytest.raises(ValueError, match=r"already picks an option of model.*: model=tiny_llama$"):
        check_command_line(["+model=tiny_llama"], CONF)
    assert check_command_line(["variant=null", "+task.x=1", "+hydra.job.name=x"], CONF) == []


@pytest.mark.parametrize("args", [["+variant=nope"], ["-m", "+experiment=table1,nope"]])
def test_a_plus_before_a_missing_option_still_names_the_option(args):
    # The check strips Hydra's '+' before looking the option up: without that, 'nope' would
    # pass here and reach Hydra's multi-line error with exit code 1.
    group = args[-1].lstrip("+").split("=")[0]
    with pytest.raises(ValueError, match=rf"^{group}=nope is not an option of conf/{group}/"):
        check_command_line(args, CONF)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["seed=1.5"], "seed must be an integer, got 1.5."),
        (["trainer.max_steps=1e3"], "trainer.max_steps must be an integer, got 1000.0."),
        (["optim.lr=${oc.env:STABLELORA_NOT_SET}"], "optim.lr cannot be resolved: "),
        (["seed=${seed}"], "seed cannot be resolved: Recursive interpolation detected"),
        (["+model=tiny_llama"], r"override it without the '\+': model=tiny_llama"),
        (["seed=0,-1", "-m"], "seed=-1 output_root=.*: seed must be >= 0, got -1."),
    ],
)
def test_cli_bad_values_stop_before_any_folder_in_one_line_exit_2(tmp_path, args, message):
    import re

    flags = [arg for arg in args if arg.startswith("-")]  # Hydra's flags come first
    values = [arg for arg in args if not arg.startswith("-")]
    result = run_cli("run.py", *flags, *SMOKE, *values, f"output_root={tmp_path}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stablelora: config error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not list(tmp_path.iterdir())  # no run or sweep folder, valid jobs included
