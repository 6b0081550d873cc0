"""Config groups compose (any adapter with any optimizer, one-word method presets), options
are strict everywhere, and a bad config is one line with exit code 2 before any model loads."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import CONF, ROOT, compose_config, offline_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stablelora.config.identity import register_resolvers

register_resolvers()


def group_options(group: str) -> list[str]:
    """A group's selectable options (files starting with ``_`` are shared bases)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_is_the_embedded_offline_job():
    cfg = compose_config()
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf"
    assert cfg.task.name == "bbc_news"
    assert cfg.method.name == "stable_lora" and cfg.optimizer.shrink_ratio == 5e-4
    assert cfg.optimizer.stop_rule == "norm" and cfg.adapter.rank == 8
    assert list(cfg.adapter.target_modules) == ["q_proj", "v_proj"]
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize(
    "group",
    [
        "model",
        "task",
        "adapter",
        "optimizer",
        "method",
        "variant",
        "trainer",
        "logger",
        "probe",
    ],
)
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    needs = {"task=toy_teacher": ["model=toy_width"]}  # the teacher has the model's width
    for option in options:
        choice = f"{group}={option}"
        cfg = compose_config([choice, *needs.get(choice, [])])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_no_group_name_is_a_prefix_of_another_and_optim_is_a_node_of_config_yaml():
    """``optimizer/`` picks the optimizer; what every optimizer shares (AdamW's settings and
    the schedule, ``optim.*``) is a node of config.yaml, not a group ``optim/`` beside it."""
    groups = sorted(path.name for path in CONF.iterdir() if path.is_dir())
    for first, second in itertools.combinations(groups, 2):
        assert not second.startswith(first), f"conf/{first}/ and conf/{second}/"
    assert "optim" not in groups
    cfg = compose_config(["optim.lr=2e-4", "optim.schedule=cosine"])
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay) == (2e-4, "cosine", 0.01)


def test_no_experiment_is_named_like_a_scale_and_an_old_name_says_the_new_one():
    """``experiment=smoke`` (one tiny run) and ``scale=smoke`` (any experiment at CI size) were
    two things under one name: the run is ``experiment=tiny_run``, and the old name is one
    line naming the new one (and the scale), before Hydra composes."""
    from stablelora.config.hydra_guards import check_command_line

    assert not set(group_options("experiment")) & set(group_options("scale"))
    message = r"^experiment=smoke is now experiment=tiny_run \(smoke is an option of conf/scale/"
    for args in (["experiment=smoke"], ["-m", "experiment=table1,smoke"]):
        with pytest.raises(ValueError, match=message + r": scale=smoke\)\.$"):
            check_command_line(args, CONF)
    assert check_command_line(["experiment=tiny_run", "scale=smoke"], CONF) == []


def test_a_shared_fragment_is_no_experiment():
    """What the tuned study's stages and the lr range study share is a fragment they include
    (``conf/shared/tuned_study.yaml``), not a file of ``conf/experiment/`` that
    ``experiment=_tuned`` would pick: neither run.py's check nor Hydra knows such an option."""
    from hydra.errors import MissingConfigException

    from stablelora.config.hydra_guards import check_command_line

    assert not list((CONF / "experiment").rglob("_*")), "a fragment in conf/experiment/"
    for name in ("_tuned", "tuned_study", "shared/tuned_study"):
        with pytest.raises(ValueError, match=f"^experiment={name} is not an option of conf/exp"):
            check_command_line([f"experiment={name}"], CONF)
        with pytest.raises(MissingConfigException):
            compose_config([f"experiment={name}"])
    for name in ("tuned_select", "tuned_final", "lr_range"):
        cfg = compose_config([f"experiment={name}", "scale=cpu"])
        assert (cfg.task.name, cfg.trainer.max_steps, cfg.trainer.eval_before) == (
            "arc_bbc",
            1000,
            False,
        ), name


def test_contract_names_exist():
    for group, names in {
        "model": [
            "tiny_llama",
            "tiny_qwen2",
            "smollm2_135m",
            "qwen2_0.5b",
            "qwen2_1.5b",
            "llama3.2_1b",
            "llama3.2_3b",
            "llama3.1_8b",
        ],
        "method": [
            "lora",
            "rslora",
            "dora",
            "adalora",
            "loraplus",
            "stable_lora",
            "stable_rslora",
            "stable_dora",
            "stable_adalora",
            "stable_loraplus",
            "riemann",
            "lora_rite",
            "adamw_large_wd",
            "shrink_fixed_steps",
        ],
        "adapter": ["lora", "rslora", "dora", "adalora", "pissa", "olora"],
        "optimizer": [
            "adamw",
            "loraplus",
            "stable_lora",
            "riemann",
            "lora_rite",
            "adamw_large_wd",
            "shrink_fixed_steps",
        ],
        "task": [
            "hellaswag",
            "siqa",
            "obqa",
            "arc_easy",
            "arc_challenge",
            "merged_qa",
            "metamath_gsm8k",
            "bbc_news",
            "arithmetic",
        ],
        "experiment": ["tiny_run"],
    }.items():
        assert set(names) <= set(group_options(group)), group


def first_job(experiment: str, scale: str) -> list[str]:
    """The overrides of the first job of the experiment's sweep at ``scale`` (group choices
    a scale's own settings make are set by the sweep: Hydra allows them no ``override``)."""
    from experiments.catalog import sweep_jobs

    return [f"experiment={experiment}", f"scale={scale}", *sweep_jobs(experiment, scale)[0]]


@pytest.mark.parametrize("scale", group_options("scale"))
@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_at_every_scale(experiment, scale):
    if (experiment, scale) == ("width_sweep", "cpu"):
        pytest.skip("the toy width sweep has no CPU scale: it runs as written or at smoke scale")
    from experiments.catalog import EXPERIMENTS

    cfg = compose_config(first_job(experiment, scale))
    OmegaConf.to_container(cfg, resolve=True)
    row = EXPERIMENTS.get(experiment)
    name = row.part_of if row is not None and row.part_of else experiment  # its sweep folder
    assert cfg.experiment_name == name
    # The scale is the command line's (scale=...), never the preset's own.
    expected = {"paper": name, "cpu": f"cpu_{name}", "smoke": f"{name}_smoke"}
    assert cfg.sweep_name == expected[scale]


def test_the_scale_is_stated_once_by_the_catalog_row_never_by_a_preset():
    """A preset says what is compared and conf/scale/ what a scale sets; which scale a CPU
    experiment runs at is its catalog row's alone (``python -m experiments <name>`` passes
    ``scale=cpu``), so no preset includes a scale of its own."""
    import yaml

    from experiments.catalog import EXPERIMENTS, experiments_at
    from experiments.common import parse_args

    for path in sorted((CONF / "experiment").rglob("*.yaml")):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        entries = [str(e if isinstance(e, str) else next(iter(e))) for e in defaults]
        assert not [e for e in entries if "scale" in e], f"{path} picks a scale"
    cpu_built = [e.name for e in EXPERIMENTS.values() if e.scale == "cpu"]
    assert {"main", "ablations", "figure2_compressed", "dialogue"} <= set(cpu_built)
    for name in cpu_built:
        assert parse_args(EXPERIMENTS[name], []).scale == "cpu", name
        assert name in experiments_at("cpu")
        # at the paper's scale only where it has settings of its own there
        paper = (CONF / "experiment" / name / "paper.yaml").exists()
        assert (name in experiments_at("paper")) == paper, name


def test_the_smoke_scale_wins_over_every_experiment_but_its_own_smoke_settings():
    from experiments.catalog import sweep_params

    smoke = OmegaConf.load(CONF / "scale" / "smoke.yaml")
    for name in group_options("experiment"):
        cfg = compose_config(first_job(name, "smoke"))
        if name != "width_sweep":  # the toy network is its own smoke model
            assert cfg.model.name == "tiny_llama", name
            swept = sweep_params(name, "smoke")
            assert cfg.optim.lr == smoke.optim.lr or "optim.lr" in swept, name
        assert cfg.logger.mode == "disabled", name
        assert cfg.trainer.max_steps <= 20 and cfg.trainer.num_threads == 1, name
    # an experiment's own smoke settings (conf/experiment/<name>/smoke.yaml) still win
    assert compose_config(["experiment=gsm8k", "scale=smoke"]).trainer.eval_every == 2
    width = compose_config(first_job("width_sweep", "smoke"))
    assert width.trainer.max_steps == 20 and width.model.name == "toy_width"


def test_task_configs_inherit_the_shared_task_base():
    base = OmegaConf.load(CONF / "task" / "_base.yaml")
    for name in group_options("task"):
        assert "_base" in OmegaConf.load(CONF / "task" / f"{name}.yaml").defaults, name
    cfg = compose_config(["task=obqa"]).task
    assert set(base) <= set(cfg) and cfg.protocol == base.protocol


@pytest.mark.parametrize("preset", group_options("method"))
def test_method_preset_selects_its_adapter_and_optimizer(preset):
    cfg = compose_config([f"method={preset}", "model=tiny_llama"])
    assert cfg.method.name == preset
    assert (cfg.adapter.name, cfg.optimizer.name) == (cfg.method.adapter, cfg.method.optimizer)
    from stablelora.config.check import check_config

    check_config(cfg)  # every preset's adapter and optimizer options are valid


def test_methods_differ_only_where_they_should():
    lora = compose_config(["method=lora"])
    assert dict(lora.optimizer) == {"name": "adamw", "builder": "adamw"}  # no foreign options
    for name, adapter, optimizer in [
        ("rslora", {"name": "rslora", "scaling": "rslora"}, {}),
        ("dora", {"name": "dora", "use_dora": True}, {}),
        ("loraplus", {}, {"name": "loraplus", "builder": "loraplus", "loraplus_lr_ratio": 16}),
        (
            "stable_lora",
            {},
            {
                "name": "stable_lora",
                "builder": "stable_lora",
                "shrink_ratio": 5e-4,
                "stop_rule": "norm",
                "loraplus_lr_ratio": None,
            },
        ),
    ]:
        cfg = compose_config([f"method={name}"])
        changed = {k: v for k, v in cfg.adapter.items() if lora.adapter.get(k) != v}
        assert changed == adapter, name
        if optimizer:
            assert dict(cfg.optimizer) == optimizer, name
        else:
            assert dict(cfg.optimizer) == dict(lora.optimizer), name


@pytest.mark.parametrize(
    "overrides,name,adapter,optimizer",
    [
        (["adapter=dora", "optimizer=riemann"], "dora+riemann", "dora", "riemann"),
        (["method=riemann", "adapter=dora"], "dora+riemann", "dora", "riemann"),
        (["adapter=dora", "method=riemann"], "dora+riemann", "dora", "riemann"),
        (["method=stable_dora", "optimizer=lora_rite"], "dora+lora_rite", "dora", "lora_rite"),
        (
            ["method=stable_lora", "optimizer.shrink_ratio=1e-3"],
            "stable_lora",
            "lora",
            "stable_lora",
        ),
        (
            ["adapter=pissa", "optimizer=adamw_large_wd"],
            "pissa+adamw_large_wd",
            "pissa",
            "adamw_large_wd",
        ),
    ],
)
def test_any_adapter_composes_with_any_optimizer(overrides, name, adapter, optimizer):
    from stablelora.config.check import check_config

    cfg = compose_config([*overrides, "model=tiny_llama"])
    assert (cfg.method.name, cfg.adapter.name, cfg.optimizer.name) == (name, adapter, optimizer)
    check_config(cfg)


def test_every_adapter_and_every_optimizer_pass_validation_together():
    """The two groups are separate nodes, so pairs that cover every option of each suffice."""
    from stablelora.config.check import check_config

    adapters, optimizers = group_options("adapter"), group_options("optimizer")
    for index in range(max(len(adapters), len(optimizers))):
        adapter, optimizer = adapters[index % len(adapters)], optimizers[index % len(optimizers)]
        cfg = compose_config([f"adapter={adapter}", f"optimizer={optimizer}", "model=tiny_llama"])
        check_config(cfg)
        assert (cfg.adapter.name, cfg.optimizer.name) == (adapter, optimizer)


# ---------------------------------------------------------------------------- strict options
def tiny_lora_model():
    from tiny import tiny_llama

    from stablelora.lora import apply_lora

    return apply_lora(tiny_llama(), rank=2, target_modules=["q_proj", "v_proj"])


def registered_methods() -> list[str]:
    from stablelora.optim import discover_optimizers

    return sorted(discover_optimizers())


@pytest.mark.parametrize("method", registered_methods())
def test_every_optimizer_rejects_an_unknown_option_naming_the_valid_ones(method):
    from stablelora.optim import create_optimizer, optimizer_options

    model = tiny_lora_model()
    with pytest.raises(ValueError, match=f"optimizer '{method}' has no option 'regg'") as error:
        create_optimizer(model, method, regg=5.0)
    assert "\n" not in str(error.value)
    for option in optimizer_options(method):
        assert option in str(error.value)
    create_optimizer(model, method, **optimizer_options(method))  # its own options: accepted


@pytest.mark.parametrize(
    "method,foreign",
    [
        ("lora", "shrink_ratio"),
        ("loraplus", "stop_rule"),
        ("riemann", "rite_eps"),
        ("lora_rite", "reg"),
        ("stable_lora", "large_wd_on"),
        ("adamw_large_wd", "shrink_ratio"),
    ],
)
def test_an_option_of_another_method_is_rejected(method, foreign):
    from stablelora.optim import create_optimizer, optimizer_options

    other = next(m for m in registered_methods() if foreign in optimizer_options(m))
    value = optimizer_options(other)[foreign]
    with pytest.raises(ValueError, match=f"has no option '{foreign}'"):
        create_optimizer(tiny_lora_model(), method, **{foreign: value})


def test_readme_example_keeps_working():
    from stablelora.optim import StableLoRA, create_optimizer

    optimizer = create_optimizer(
        tiny_lora_model(), method="stable_lora", lr=1e-4, weight_decay=0.01, shrink_ratio=5e-4
    )
    assert isinstance(optimizer, StableLoRA) and optimizer.shrink_ratio == 5e-4


def test_apply_lora_rejects_an_unknown_option_naming_the_valid_ones():
    from tiny import tiny_llama

    from stablelora.lora import apply_lora

    with pytest.raises(ValueError, match="apply_lora has no option 'rnk'.*rank, alpha") as error:
        apply_lora(tiny_llama(), rnk=4)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="has no option 'init_rr'.*init_r"):
        apply_lora(tiny_llama(), adapter="adalora", adalora={"total_step": 10, "init_rr": 4})


# ---------------------------------------------------------------------------- config errors
def test_validation_accepts_every_composed_default():
    from stablelora.config.check import check_config

    for method in ("lora", "rslora", "loraplus", "stable_lora"):
        check_config(compose_config([f"method={method}", "model=tiny_llama"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("adapter.rank=0", "adapter.rank must be a positive integer"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("optim.lr=-1e-4", "optim.lr must be positive"),
        ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
        ("trainer.batch_size=2.5", "trainer.batch_size must be an integer"),
        ("trainer.progress_bar=sometimes", "trainer.progress_bar must be true or false"),
        ("optimizer.shrink_ratio=1.0", r"optimizer.shrink_ratio must be in \[0, 1\)"),
        ("optimizer.shrink_ratio=-0.1", r"optimizer.shrink_ratio must be in \[0, 1\)"),
        ("optimizer.stop_rule=sometimes", "Unknown stop_rule"),
        ("optimizer.builder=adam", "Unknown method 'adam'"),
        ("adapter.scaling=sqrt", "adapter.scaling must be one of"),
        ("trainer.max_steps=0", "trainer.max_steps must be positive"),
        ("model=llama3.2_1b", "not available offline.*model.path="),
        ("task=arc_easy", "task.data_dir"),
        ("task.max_length=1", "task.max_length=1 cannot hold a prompt token and an answer"),
        ("+optim.lrr=1e-4", "optim.lrr is not a key of optim.*lr, max_grad_norm.*conf/config.yaml"),
        ("+trainer.foo=1", "trainer.foo is not a key of trainer"),
        ("+task.max_lenght=64", "task.max_lenght is not a key of task"),
        ("+probe.every_n=3", "probe.every_n is not a key of probe"),
        ("+method.options.regg=5", "method.options is not a key of method"),
        ("+optimizer.regg=5", "optimizer=stable_lora .* has no option 'regg'.*shrink_ratio"),
        ("+adapter.rnk=4", "adapter=lora has no option 'rnk'.*rank"),
        ("output_root=/dev/null", "output_root=/dev/null: /dev/null is a file"),
        # Each of these used to run with a traceback after the model loaded, or silently.
        ("seed=1.5", r"^seed must be an integer, got 1.5\.$"),
        ("seed=1e999", r"^seed must be an integer, got inf\.$"),
        ("seed=nan", r"^seed must be an integer, got nan\.$"),
        ("seed=null", r"^seed must be an integer, got null\.$"),
        ("seed=true", r"^seed must be an integer, got true\.$"),
        ("seed=-1", r"^seed must be >= 0, got -1\.$"),
        ("seed=99999999999999999999", r"^seed must be <= 4294967295"),
        ("trainer.max_steps=1e3", r"^trainer.max_steps must be an integer, got 1000.0\.$"),
        ("trainer.log_every=0", r"^trainer.log_every must be positive, got 0\.$"),
        ("trainer.eval_batch_size=-1", r"^trainer.eval_batch_size must be positive"),
        ("trainer.max_eval_examples=-1", r"^trainer.max_eval_examples must be positive"),
        ("trainer.checkpoint_every=-5", r"^trainer.checkpoint_every must be >= 0, got -5\.$"),
        ("optim.lr=inf", r"^optim.lr must be a finite number, got inf\.$"),
        ("optim.betas=[0.9,1.5]", r"^optim.betas.1 must be < 1.0, got 1.5\.$"),
        ("logger.mode=on", r"^logger.mode must be one of 'offline', 'online' or 'disabled'"),
        ("analysis.primary.alpha=0.7", r"^analysis.primary.alpha must be < 0.5"),
        ("optim.lr=${oc.env:STABLELORA_NOT_SET}", r"^optim.lr cannot be resolved: .*NOT_SET"),
        ("seed=${seed}", r"^seed cannot be resolved: Recursive interpolation detected"),
        ("model.config.num_attention_heads=5", r"^model.config cannot build tiny_llama: .*hidden"),
    ],
)
def test_bad_values_are_one_clear_line(override, message, monkeypatch):
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message) as error:
        check_config(compose_config(["model=tiny_llama", override]))
    assert "\n" not in str(error.value)


def test_an_option_of_another_optimizer_is_a_config_error():
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    cfg = compose_config(["model=tiny_llama", "method=lora", "+optimizer.shrink_ratio=5e-4"])
    with pytest.raises(ConfigError, match="optimizer=adamw .*has no option 'shrink_ratio'"):
        check_config(cfg)
    cfg = compose_config(["model=tiny_llama", "method=riemann", "+optimizer.regg=5"])
    with pytest.raises(ConfigError, match="has no option 'regg': its options are reg, autho"):
        check_config(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_root_is_a_config_error(tmp_path):
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not writable"):
        check_config(compose_config(["model=tiny_llama", f"output_root={locked}/out"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+optim.lrr=1e-4"], "optim.lrr is not a key of optim"),
        (["output_root=/dev/null/x"], "/dev/null is a file"),
        (["-m", "output_root=/dev/null/x", "seed=0,1"], "/dev/null is a file"),
    ],
)
def test_runner_config_error_is_one_line_exit_2_before_the_model_loads(
    overrides, message, tmp_path
):
    if "output_root=/dev/null/x" not in overrides:
        overrides = [*overrides, f"output_root={tmp_path}"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            *overrides,
            "model=tiny_llama",
            "logger.mode=disabled",
        ],
        cwd=tmp_path,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "config error" in lines[0], lines
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("adapter"))
    assert not list(tmp_path.glob("runs/*"))  # no run folder left behind


# ---------------------------------------------------------------------------- extension points
NEW_OPTIMIZER = '''
"""Sign descent: a test optimizer added as one module."""

import torch

from stablelora.optim import register_optimizer


class SignDescent(torch.optim.Optimizer):
    def __init__(self, params, lr, step_scale):
        super().__init__(params, {"lr": lr * step_scale})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@register_optimizer("{name}")
def build(model, pairs, adamw, *, step_scale=1.0):
    params = [p for p in model.parameters() if p.requires_grad]
    return SignDescent(params, adamw.lr, step_scale)
'''


@pytest.fixture
def extension_dirs(tmp_path, monkeypatch):
    """A module folder appended to the optim and tasks packages, a config folder for Hydra;
    the imported modules and registrations are removed afterwards."""
    import stablelora.optim
    import stablelora.tasks
    from stablelora.optim import OPTIMIZERS

    code, conf = tmp_path / "code", tmp_path / "conf"
    code.mkdir()
    monkeypatch.setattr(stablelora.optim, "__path__", [*stablelora.optim.__path__, str(code)])
    monkeypatch.setattr(stablelora.tasks, "__path__", [*stablelora.tasks.__path__, str(code)])
    before_modules, before_optimizers = set(sys.modules), dict(OPTIMIZERS)
    yield code, conf
    for name in set(sys.modules) - before_modules:
        if name.startswith(("stablelora.optim.", "stablelora.tasks.")):
            del sys.modules[name]
    OPTIMIZERS.clear()
    OPTIMIZERS.update(before_optimizers)


def test_a_new_optimizer_is_one_module_and_one_yaml(extension_dirs):
    from stablelora.config.check import check_config, optimizer_arguments
    from stablelora.config.errors import ConfigError
    from stablelora.optim import create_optimizer, optimizer_options

    code, conf = extension_dirs
    name = "test_sign_descent"
    (code / f"{name}.py").write_text(NEW_OPTIMIZER.replace("{name}", name))
    (conf / "optimizer").mkdir(parents=True)
    (conf / "optimizer" / f"{name}.yaml").write_text(
        f"name: {name}\nbuilder: {name}\nstep_scale: 0.5\n"
    )
    assert optimizer_options(name) == {"step_scale": 1.0}  # found without a registry edit
    cfg = compose_config([f"optimizer={name}", "adapter=dora", "model=tiny_llama"], [conf])
    assert cfg.method.name == f"dora+{name}"
    check_config(cfg, config_dirs=[CONF, conf])
    builder, options = optimizer_arguments(OmegaConf.to_container(cfg.optimizer))
    model = tiny_lora_model()
    optimizer = create_optimizer(model, builder, lr=0.1, **options)
    pair_A = next(p for n, p in model.named_parameters() if "lora_A" in n)
    before = pair_A.detach().clone()
    pair_A.grad = torch.ones_like(pair_A)
    optimizer.step()
    assert torch.allclose(pair_A, before - 0.05)  # lr * step_scale, the yaml's option
    with pytest.raises(ConfigError, match=f"optimizer={name} .*no option 'regg'.*step_scale"):
        check_config(
            compose_config([f"optimizer={name}", "model=tiny_llama", "+optimizer.regg=1"], [conf]),
            config_dirs=[CONF, conf],
        )


NEW_TASK = '''
"""Parity: is the number even? A test task family added as one module."""

from stablelora.tasks.base import MultipleChoiceTask
from stablelora.tasks.prompts import MultipleChoiceExample

KIND = "multiple_choice"


def sources(cfg):
    return []


def example(number):
    return MultipleChoiceExample(
        query=f"Is {number} even?", choices=["yes", "no"], gold=number % 2,
        instruction=f"Is {number} even? Answer yes or no.",
    )


def build(cfg, tokenizer, *, seed):
    count = cfg.options["num_examples"]
    examples = [example(n) for n in range(count)]
    return MultipleChoiceTask(cfg, tokenizer, examples, {cfg.name: examples}, "acc")
'''


def test_a_new_task_family_is_one_module_and_one_yaml(extension_dirs):
    from tiny import byte_llama, byte_tokenizer

    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError
    from stablelora.tasks import build_task, families, task_record

    code, conf = extension_dirs
    (code / "test_parity.py").write_text(NEW_TASK)
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "parity.yaml").write_text(
        textwrap.dedent("""\
        defaults:
          - _base
          - _self_
        name: parity
        family: test_parity
        max_length: 32
        num_examples: 12
    """)
    )
    assert "test_parity" in families()  # found without a registry edit
    cfg = compose_config(["task=parity", "model=tiny_llama"], [conf])
    check_config(cfg, config_dirs=[CONF, conf])
    task = build_task(cfg.task, byte_tokenizer(), seed=0)
    assert task.num_train_examples == 12 and task.collate([0, 1])["input_ids"].shape[0] == 2
    metrics = task.evaluate(byte_llama(), batch_size=4)
    assert metrics["n"] == 12 and 0 <= metrics["acc"] <= 1
    # What its runs record for the analysis to route them on: from the module, no list.
    assert task_record(cfg.task) == {
        "task_family": "test_parity",
        "task_kind": "multiple_choice",
        "protocol": "loglik",
    }
    bad = compose_config(["task=parity", "model=tiny_llama", "+task.num_exampels=3"], [conf])
    with pytest.raises(ConfigError, match="task.num_exampels is not a key of task"):
        check_config(bad, config_dirs=[CONF, conf])


@pytest.mark.parametrize(
    "launcher,target",
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
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


def test_the_docs_options_table_is_the_schemas():
    from stablelora.config.schema import options_table

    text = (ROOT / "docs" / "runner.md").read_text()
    table = text.split("<!-- options:begin -->\n")[1].split("<!-- options:end -->")[0]
    assert table == options_table(), "run: python -m stablelora.config.schema, paste in docs"


def test_the_schemas_choices_are_the_codes():
    from typing import get_args

    from analysis.tables.equivalence import AVERAGES, CORRECTIONS, DECLARED, RESAMPLINGS
    from stablelora.config.schema import (
        ModelSchema,
        PlanSchema,
        TaskSchema,
        TrainerSchema,
    )
    from stablelora.contamination import SPLIT_RULES
    from stablelora.models import DTYPES, SOURCES
    from stablelora.runner.lm_head import HEAD_MODES
    from stablelora.tasks.data import PROMPT_FORMATS, PROTOCOLS

    def choices(schema, key):
        return set(get_args(schema.model_fields[key].annotation))

    assert choices(TrainerSchema, "lm_head") == set(HEAD_MODES)
    assert choices(ModelSchema, "source") == set(SOURCES)
    assert choices(ModelSchema, "dtype") == set(DTYPES)
    assert choices(TaskSchema, "protocol") == set(PROTOCOLS)
    assert choices(TaskSchema, "prompt_format") == set(PROMPT_FORMATS)
    assert choices(TaskSchema, "split_rule") == set(SPLIT_RULES)
    assert choices(PlanSchema, "resample") == set(RESAMPLINGS)
    assert choices(PlanSchema, "average") == set(AVERAGES)
    assert choices(PlanSchema, "correction") == set(CORRECTIONS)
    assert choices(PlanSchema, "declared") == set(DECLARED)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_preset_meets_the_schema_at_every_scale(experiment):
    from omegaconf import OmegaConf

    from stablelora.config.schema import check_schema

    for scale in ("paper", "cpu", "smoke"):
        cfg = compose_config([f"experiment={experiment}", f"scale={scale}"])
        top = [str(key) for key in cfg if key != "hydra"]
        try:
            plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, top), resolve=True)
        except Exception:  # noqa: BLE001 - interpolations a sweep's variant fills in
            continue
        check_schema(plain)
