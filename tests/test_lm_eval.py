"""``python -m stablelora.lm_eval``: lm-eval's HFLM on a run's adapter, offline."""

import json

import pytest
from helpers import ROOT, SMOKE, compose_config, run_cli

ARC_FIXTURE = ROOT / "tests" / "fixtures" / "tasks" / "arc_easy"
#: lm-eval's own arc_easy.yaml, reading the ARC-Easy fixture instead of the Hub.
TASK_YAML = """\
task: arc_easy_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def arc_run(tmp_path_factory):
    """A completed smoke run on the ARC-Easy fixture (its adapter and records)."""
    from stablelora.runner.train import train

    run_dir = tmp_path_factory.mktemp("lm_eval") / "run"
    overrides = [f"task.data_dir={ARC_FIXTURE}", "optim.lr=2e-2", "trainer.eval_before=false"]
    cfg = compose_config([*SMOKE, "task=arc_easy", *overrides])
    summary = train(cfg, run_dir)
    assert summary["status"] == "completed"
    return run_dir, cfg, summary


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "arc_easy_fixture.yaml").write_text(TASK_YAML.format(test=ARC_FIXTURE / "test.jsonl"))
    return folder


@pytest.mark.slow  # lm-eval indexes its few thousand task YAMLs (~10 s)
def test_lm_eval_scores_the_adapter_as_the_projects_own_evaluation(arc_run, task_dir, one_thread):
    """Same adapter, same examples: lm-eval's acc and acc_norm equal the project's loglik
    evaluation, and every choice's log-likelihood agrees."""
    pytest.importorskip("lm_eval")
    from stablelora.lm_eval import evaluate_run, load_run_model
    from stablelora.tasks import build_task

    run_dir, cfg, summary = arc_run
    results, path = evaluate_run(
        run_dir,
        ["arc_easy_fixture"],
        include_path=str(task_dir),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    assert path == run_dir / "lm_eval" / "arc_easy_fixture.json"
    stored = json.loads(path.read_text())
    scores = stored["results"]["arc_easy_fixture"]

    model, tokenizer, _ = load_run_model(run_dir)
    task = build_task(cfg.task, tokenizer, seed=cfg.seed)
    ours = task.evaluate(model, batch_size=4)
    assert ours["n"] == len(results["samples"]["arc_easy_fixture"]) == 3
    assert scores["acc,none"] == pytest.approx(ours["acc"])
    assert scores["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert ours["acc"] == pytest.approx(summary["final"]["eval/acc"])  # the run's final eval

    # Per choice: lm-eval's log-likelihoods against the project's on the same requests.
    from stablelora.tasks.prompts import multiple_choice_requests
    from stablelora.tasks.scoring import loglikelihoods

    examples = {example.query: example for example in task.eval_sets["arc_easy"]}
    for sample in results["samples"]["arc_easy_fixture"]:
        example = examples[f"Question: {sample['doc']['question']}\nAnswer:"]
        context, choices = multiple_choice_requests(example, task.cfg.prompt_format)
        requests = [
            task.encoder.loglik_request(context, " " + choice, task.cfg.max_length)
            for choice in choices
        ]
        expected = loglikelihoods(model, requests, batch_size=4, pad_id=task.encoder.pad_id)
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(list(expected), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_the_command_line_writes_results_beside_the_records(arc_run, task_dir):
    pytest.importorskip("lm_eval")
    run_dir, _, _ = arc_run
    result = run_cli(
        "-m", "stablelora.lm_eval", str(run_dir), "--tasks", "arc_easy_fixture",
        "--include-path", str(task_dir), "--device", "cpu", "--limit", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "arc_easy_fixture" in result.stdout and "acc" in result.stdout
    stored = json.loads((run_dir / "lm_eval" / "arc_easy_fixture.json").read_text())
    assert stored["results"]["arc_easy_fixture"]["alias"] == "arc_easy_fixture"
    assert (run_dir / "summary.json").exists() and (run_dir / "adapter").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "no_such_task_xyz"], "unknown lm-eval task(s) ['no_such_task_xyz']"),
        (["--tasks", ""], "no tasks"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(arc_run, args, message):
    pytest.importorskip("lm_eval")
    run_dir, _, _ = arc_run
    result = run_cli("-m", "stablelora.lm_eval", str(run_dir), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_folder_without_an_adapter_is_a_usage_error(tmp_path):
    from stablelora.lm_eval import LmEvalError, evaluate_run

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(LmEvalError, match="has no adapter/"):
        evaluate_run(tmp_path, ["arc_easy"])
    with pytest.raises(LmEvalError, match="not a run folder"):
        evaluate_run(tmp_path / "missing", ["arc_easy"])


def test_a_diverged_run_or_a_damaged_config_is_one_line(tmp_path, capsys):
    """A diverged run never gets an adapter (rerunning it does nothing): say so, not "finish
    the run"; a config.yaml that is not a mapping is damaged records, not a traceback."""
    import yaml

    from stablelora.lm_eval import main
    from stablelora.records.summary import make_summary

    config = {"seed": 0, "model": {"name": "tiny_llama"}, "task": {"name": "bbc_news"},
              "method": {"name": "lora"}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    summary = make_summary("diverged", config, error="loss is nan at step 3", steps=3)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--tasks", "arc_easy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "diverged (loss is nan at step 3): it has no usable adapter" in err[0]
    assert "evaluate another run" in err[0] and "finish the run" not in err[0]

    (tmp_path / "adapter").mkdir()
    for text, kind in (("- model\n- seed\n", "list"), ("", "empty file")):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path), "--tasks", "arc_easy"])
        message = str(exit_info.value.code)  # sys.exit(message): one line, exit code 1
        assert message.startswith("stablelora.lm_eval: ") and "\n" not in message
        assert f"config.yaml is a YAML {kind}, not a run's config: restore" in message


def test_a_truncated_adapter_names_the_file_and_what_to_do(arc_run, tmp_path):
    import shutil

    from stablelora.lm_eval import load_run_model
    from stablelora.records.layers import RecordsError

    run_dir = tmp_path / "run"
    shutil.copytree(arc_run[0], run_dir)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    with pytest.raises(RecordsError) as error:
        load_run_model(run_dir)
    message = str(error.value)
    assert message.startswith(f"{weights} cannot be read (") and "\n" not in message
    assert f"delete {run_dir / 'adapter'} and rerun the run's command" in message


@pytest.mark.slow  # lm-eval indexes its few thousand task YAMLs (~10 s)
def test_a_hub_task_offline_is_one_line_pointing_to_include_path(arc_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    run_dir, _, _ = arc_run
    result = run_cli("-m", "stablelora.lm_eval", str(run_dir), "--tasks", "arc_easy",
                     "--device", "cpu", "--limit", "2")  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    # the libraries' own warnings (as in a run that succeeds) come first; then one line
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stablelora.lm_eval: the data of lm-eval task(s) ['arc_easy'] cannot")
    assert "--include-path a folder with a task YAML over local files" in last
