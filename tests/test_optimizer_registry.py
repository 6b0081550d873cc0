"""Every optimizer is registered once with its options, and what the configs and the docs say
about them agrees with the registry: the options of ``conf/optimizer/*.yaml`` and their
defaults, AdamW's shared settings (``optim:`` in ``conf/config.yaml``), the options table of
docs/library.md."""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import replace

import pytest
import torch
import yaml
from helpers import CONF, ROOT

from stablelora.config.groups import group_option, group_options
from stablelora.optim import OPTIMIZERS, create_optimizer, discover_optimizers
from stablelora.optim.adamw_settings import ADAMW_DEFAULTS
from stablelora.optim.lora_rite import RITE_DEFAULTS, LoRARITE
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.registry import ADAMW_SETTINGS, AdamWSettings, register_optimizer
from stablelora.optim.riemann import RiemannianAdamW
from stablelora.optim.stable_lora import StableLoRA

#: Registered optimizers that no ``conf/optimizer/`` yaml selects, and why.
NO_YAML = {
    # AdamW plus a warning for a model without rsLoRA scaling: the runner's rsLoRA is
    # adapter=rslora with optimizer=adamw (method=rslora), whose scale is the adapter's.
    "rslora",
}


def optimizer_yamls() -> dict[str, dict]:
    """``conf/optimizer/<name>.yaml`` as Hydra composes it, by name."""
    return {
        name: group_option("optimizer", name, [CONF]) for name in group_options(CONF, "optimizer")
    }


@pytest.mark.parametrize("name", group_options(CONF, "optimizer"))
def test_each_optimizer_yaml_sets_exactly_its_builders_options(name):
    cfg = optimizer_yamls()[name]
    assert cfg["name"] == name
    registered = discover_optimizers().get(cfg["builder"])
    assert registered is not None, f"optimizer/{name}.yaml: builder {cfg['builder']!r} unknown"
    own = {key: value for key, value in cfg.items() if key not in ("name", "builder")}
    assert list(own) == list(registered.options), name  # every option, in signature order
    if name == cfg["builder"]:  # the builder's own yaml states its defaults
        for option, default in registered.options.items():
            value = own[option]
            assert value == default and isinstance(value, bool) == isinstance(default, bool), option


def test_every_registered_optimizer_has_a_yaml():
    builders = {cfg["builder"] for cfg in optimizer_yamls().values()}
    assert set(discover_optimizers()) - builders == NO_YAML
    assert set(OPTIMIZERS) >= NO_YAML  # an exception of a removed optimizer goes too


def test_adamw_settings_yaml_holds_create_optimizers_defaults():
    optim = yaml.safe_load((CONF / "config.yaml").read_text())["optim"]
    parameters = inspect.signature(create_optimizer).parameters
    for name in ADAMW_SETTINGS:
        default = parameters[name].default
        assert default == getattr(ADAMW_DEFAULTS, name), name  # written once: AdamWSettings
        assert optim[name] == (list(default) if isinstance(default, tuple) else default), name


@pytest.mark.parametrize("optimizer", [StableLoRA, RiemannianAdamW, LoRARITE])
def test_every_optimizer_class_takes_adamws_defaults_from_adamw_settings(optimizer):
    """The classes keep AdamW's keyword arguments (drop-in replacements for torch's AdamW) with
    the defaults of AdamWSettings; LoRA-RITE's one exception is its reference's weight decay 0."""
    expected = RITE_DEFAULTS if optimizer is LoRARITE else ADAMW_DEFAULTS
    assert expected == replace(ADAMW_DEFAULTS, weight_decay=expected.weight_decay)
    parameters = inspect.signature(optimizer).parameters
    assert {name: parameters[name].default for name in ADAMW_SETTINGS} == expected.kwargs()
    # and the optimizer built without them holds those values in its parameter group
    A, B = torch.nn.Parameter(torch.ones(2, 4)), torch.nn.Parameter(torch.zeros(4, 2))
    built = optimizer([A, B], [LoRAPair("layer", A, B, 1.0)])
    group = built.param_groups[0]
    assert {name: group[name] for name in ADAMW_SETTINGS} == expected.kwargs()
    assert RITE_DEFAULTS.weight_decay == 0.0 and ADAMW_DEFAULTS.weight_decay == 0.01


def test_docs_table_lists_every_optimizer_with_its_defaults():
    text = (ROOT / "docs" / "library.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|.*\| ([^|]+) \|$", text, flags=re.MULTILINE)
    table = {method: cell.strip() for method, cell in rows if method in OPTIMIZERS}
    assert set(table) == set(discover_optimizers())
    for method, cell in table.items():
        stated = {}
        if cell != "none":
            for item in re.findall(r"`(\w+)=([^`]+)`", cell):
                stated[item[0]] = ast.literal_eval(item[1])
        assert stated == OPTIMIZERS[method].options, method


def test_options_come_from_the_builder_and_the_class_it_forwards_to():
    options = discover_optimizers()["stable_lora"].options
    assert list(options) == ["shrink_ratio", "stop_rule", "loraplus_lr_ratio"]
    parameters = inspect.signature(RiemannianAdamW).parameters
    assert discover_optimizers()["riemann"].options == {
        name: parameters[name].default for name in ("reg", "authors_variant", "scaled_gd")
    }
    # layout (per device) and AdamW's settings are no option of any method
    for registered in OPTIMIZERS.values():
        assert not {"layout", *ADAMW_SETTINGS} & set(registered.options)


def test_an_option_without_a_default_is_refused():
    with pytest.raises(TypeError, match=r"\['step_scale'\].*need a default"):

        @register_optimizer("test_no_default")
        def build(model, pairs, adamw, *, step_scale):
            raise AssertionError("never built")

    assert "test_no_default" not in OPTIMIZERS


def test_adamw_settings_are_adamws_keyword_arguments():
    settings = AdamWSettings(1e-3, 0.1, (0.8, 0.9), 1e-6, None, None)
    assert list(settings.kwargs()) == list(ADAMW_SETTINGS)
    assert set(ADAMW_SETTINGS) <= set(inspect.signature(torch.optim.AdamW).parameters)
