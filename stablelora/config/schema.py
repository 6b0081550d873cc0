"""The declared type and range of every key a run's config shares, whichever options compose it:
one pydantic model per config group (:class:`RunSchema` for the whole config), checked by
:func:`check_schema` on the resolved config before any folder or model exists, and printed as
the options table of ``docs/runner.md`` (``python -m stablelora.config.schema``).

Strict: ``trainer.max_steps=1e3`` (a float), ``seed=true`` (a bool) and ``seed=1.5`` are
refused, not converted; an integer is accepted where a number is. Keys an option adds of its
own (a task family's ``subtasks``, a Hub model's ``revision``) are allowed here and checked
against the keys the group's yaml files declare (:mod:`stablelora.config.groups`); the
``adapter`` and ``optimizer`` groups are checked against ``apply_lora``'s and the optimizer
builders' signatures (:mod:`stablelora.config.check`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The largest seed every generator the run seeds takes (numpy's legacy seeding: 2**32 - 1).
MAX_SEED = 2**32 - 1

Count = Annotated[int, Field(gt=0)]
Steps = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Group(BaseModel):
    """A config group: strict types; keys of its own options allowed (checked elsewhere)."""

    model_config = ConfigDict(strict=True, extra="allow")


class TrainerSchema(_Group):
    max_steps: Count = Field(description="optimizer steps")
    batch_size: Count = Field(description="sequences per step and process")
    grad_accum: Count = Field(description="micro-batches per optimizer step")
    length_grouping: Steps = Field(
        description="pool size (batches) of length-grouped batches; 0: plain shuffled stream"
    )
    lm_head: Literal["used", "all"] = Field(
        description="LM head on the positions a loss or score reads (`used`) or on all"
    )
    packing: bool = Field(
        description="train on packed batches (one row, no padding; the same loss)"
    )
    eval_every: Steps = Field(description="evaluate every N steps; 0: before and after only")
    eval_before: bool = Field(description="evaluate at step 0")
    eval_batch_size: Count = Field(description="sequences per scoring batch")
    max_eval_examples: Count | None = Field(description="score at most this many eval examples")
    log_every: Count = Field(description="log the training loss every N steps")
    checkpoint_every: Steps = Field(description="checkpoint every N steps; 0: no checkpoints")
    resume: bool = Field(description="rerunning the same command continues its run")
    device: Literal["auto", "cpu", "cuda"] = Field(description="where the run computes")
    deterministic: bool = Field(description="torch deterministic algorithms")
    num_threads: Count | None = Field(description="torch CPU threads; null: torch's default")
    progress_bar: bool = Field(description="show a progress bar")


class OptimSchema(_Group):
    lr: Positive = Field(description="peak learning rate")
    weight_decay: NonNegative = Field(description="AdamW's decoupled weight decay")
    betas: Annotated[
        list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)
    ] = Field(description="AdamW's (beta1, beta2), each in [0, 1)")
    eps: Positive = Field(description="AdamW's epsilon")
    schedule: Literal["linear", "cosine", "constant"] = Field(description="lr schedule")
    warmup_steps: Steps = Field(description="linear warm-up steps")
    max_grad_norm: Positive | None = Field(description="gradient clipping; null: none")
    foreach: bool | None = Field(description="torch AdamW's foreach; null: fastest")
    fused: bool | None = Field(description="torch AdamW's fused; null: fastest")


class ProbeSchema(_Group):
    enabled: bool = Field(description="log the feature-update probes")
    first_steps: Steps = Field(description="probe every step during the first K steps")
    every: Count = Field(description="then every M steps")
    max_tokens: Count = Field(description="token positions of Z kept per layer")
    per_layer: bool = Field(description="write per-layer records (layers.parquet)")


class LoggerSchema(_Group):
    mode: Literal["offline", "online", "disabled"] = Field(description="W&B mode")
    project: str = Field(description="W&B project")
    entity: str | None = Field(description="W&B entity")
    group: str | None = Field(description="W&B group (default: the sweep)")
    tags: list[str] = Field(description="W&B tags")
    init_timeout: Positive = Field(description="seconds W&B may take to start")
    per_layer_every: Count = Field(description="log per-layer charts every N steps")


class ModelSchema(_Group):
    name: str = Field(description="the model's name in run folders and tables")
    source: Literal["config", "gguf", "hub", "toy"] = Field(description="where it loads from")
    tokenizer: str | None = Field(description="tokenizer; null: the model's own")
    path: str | None = Field(description="Hub id or local folder (source hub)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="base weights")
    precision: Literal["auto", "fp32", "bf16"] = Field(description="autocast")
    gradient_checkpointing: bool = Field(description="recompute activations in backward")
    attn_implementation: str | None = Field(description="transformers' attention (sdpa, eager)")


class TaskSchema(_Group):
    name: str = Field(description="the task's name in run folders and tables")
    family: str = Field(description="the module stablelora/tasks/<family>.py")
    hub_id: str | None = Field(description="the Hub dataset")
    hub_config: str | None = Field(description="the Hub dataset's config")
    train_split: str = Field(description="split trained on")
    eval_split: str = Field(description="split scored")
    data_dir: str | None = Field(description="local copies: <data_dir>/<split>.jsonl|json|parquet")
    protocol: Literal["loglik", "generate"] = Field(description="how answers are scored")
    prompt_format: Literal["plain", "llm_adapters"] = Field(description="prompt template")
    max_train_examples: Count | None = Field(description="train subsample (by seed)")
    max_eval_examples: Count | None = Field(description="fixed eval subsample")
    max_length: Count = Field(description="tokens of a training sequence (at least 2)")
    max_new_tokens: Count = Field(description="tokens generated (protocol generate)")
    split_rule: Literal["content", "legacy"] = Field(description="how splits are kept apart")


class PlanSchema(_Group):
    resample: Literal["seeds_and_questions", "questions", "seeds"] = Field(
        description="unit of resampling"
    )
    average: Literal["tasks", "questions"] = Field(description="how tasks are averaged")
    margin_pp: Positive | None = Field(description="equivalence margin (pp); null: no TOST")
    margin_rule: str | None = Field(description="why this margin")
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = Field(description="test level")
    correction: Literal["holm", "none"] = Field(description="multiplicity correction")
    declared: Literal["before_runs", "after_results"] = Field(description="when it was declared")


class AnalysisSchema(_Group):
    primary: PlanSchema = Field(description="the pre-declared primary analysis")


class RunSchema(BaseModel):
    """A run's whole config; ``adapter``, ``optimizer`` and ``method`` are checked against the
    functions that take them (:func:`stablelora.config.check.check_config`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(description="the run's seed")
    output_root: Annotated[str, Field(min_length=1)] = Field(description="where runs are written")
    data_root: str | None = Field(description="local dataset copies; null: the Hub")
    sweep_name: Annotated[str, Field(min_length=1)] = Field(description="W&B group, sweep folder")
    experiment_name: str | None = Field(default=None, description="the experiment preset's name")
    model: ModelSchema
    task: TaskSchema
    adapter: dict[str, Any]
    optimizer: dict[str, Any]
    method: dict[str, Any]
    optim: OptimSchema
    trainer: TrainerSchema
    logger: LoggerSchema
    probe: ProbeSchema
    analysis: AnalysisSchema


def check_schema(config: dict) -> None:
    """Raise a one-line ValueError (``trainer.max_steps must be an integer, got 1000.0.``) for
    the first value of ``config`` (a resolved plain dict) whose type or range is wrong."""
    try:
        RunSchema.model_validate(config)
    except ValidationError as error:
        raise ValueError(describe(dict(error.errors()[0]))) from None


def describe(error: dict) -> str:
    """One pydantic error as ``<key> must be <what>, got <value>.``"""
    key = ".".join(str(part) for part in error["loc"])
    kind, context, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return f"{key} is missing: set it (e.g. {key}=...) or pick a config option that sets it."
    bound = next((context[k] for k in ("gt", "ge", "lt", "le") if k in context), None)
    what = {
        "int_type": "an integer",
        "int_from_float": "an integer",
        "bool_type": "true or false",
        "float_type": "a number",
        "string_type": "a string (quote it)",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "finite_number": "a finite number",
        "greater_than": "positive" if bound == 0 else f"> {bound}",
        "greater_than_equal": f">= {bound}",
        "less_than": f"< {bound}",
        "less_than_equal": f"<= {bound}",
        "literal_error": f"one of {context.get('expected')}",
        "too_short": f"at least {context.get('min_length')} long",
        "too_long": f"at most {context.get('max_length')} long",
    }.get(kind, error["msg"][0].lower() + error["msg"][1:])
    return f"{key} must be {what}, got {_as_yaml(value)}."


def _as_yaml(value) -> str:
    """A value as a user writes it on the command line (``null``, ``true``, ``1.5``, ``'abc'``)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value)


def options_table() -> str:
    """The options table of ``docs/runner.md``: every schema key with its type and range (from
    the schema's JSON schema) and its value in the default config."""
    schema = RunSchema.model_json_schema()
    defaults = _defaults()
    lines = ["| key | type and range | default | what |", "|---|---|---|---|"]

    def walk(node: dict, prefix: str) -> None:
        for name, spec in node["properties"].items():
            if "$ref" in spec:
                walk(schema["$defs"][spec["$ref"].split("/")[-1]], f"{prefix}{name}.")
            elif spec.get("type") != "object":
                key = f"{prefix}{name}"
                lines.append(
                    f"| `{key}` | {_type_words(spec)} | {defaults.get(key, '')} "
                    f"| {spec.get('description', '')} |"
                )

    walk(schema, "")
    return "\n".join(lines) + "\n"


def _type_words(spec: dict) -> str:
    """``int > 0, or null``: one JSON-schema property in words."""
    options = spec.get("anyOf", [spec])
    nullable = any(option.get("type") == "null" for option in options)
    option = next(option for option in options if option.get("type") != "null")
    if "enum" in option:
        words = " \\| ".join(f"`{value}`" for value in option["enum"])
    else:
        kind = option.get("type", "any")
        words = {"integer": "int", "number": "number", "boolean": "bool", "string": "str"}.get(
            kind, kind
        )
        if kind == "array":
            items = option.get("items", {})
            words = f"list of {_type_words(items)}"
            if option.get("minItems") == option.get("maxItems") is not None:
                words = f"{option['minItems']} x {_type_words(items)}"
        low = [
            (option[k], b) for k, b in (("exclusiveMinimum", "("), ("minimum", "[")) if k in option
        ]
        high = [
            (option[k], b) for k, b in (("exclusiveMaximum", ")"), ("maximum", "]")) if k in option
        ]
        if low and high:
            words += f" in {low[0][1]}{low[0][0]}, {high[0][0]}{high[0][1]}"
        elif low:
            words += f" {'>' if low[0][1] == '(' else '>='} {low[0][0]}"
        elif high:
            words += f" {'<' if high[0][1] == ')' else '<='} {high[0][0]}"
        if option.get("minLength"):
            words += ", not empty"
    return words + (", or null" if nullable else "")


def _defaults() -> dict[str, str]:
    """``key -> its value in the default config`` (conf/config.yaml composed, unresolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stablelora.config.groups import CONF
    from stablelora.config.identity import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = cast(dict, OmegaConf.to_container(compose("config"), resolve=False))
    flat: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                text = json.dumps(value) if not isinstance(value, str) else value
                text = text.replace("|", "\\|")
                flat[f"{prefix}{key}"] = f"`{text}`"

    walk(cfg, "")
    return flat


if __name__ == "__main__":
    print(options_table(), end="")
