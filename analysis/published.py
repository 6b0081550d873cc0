"""The published numbers of the Stable-LoRA paper, keyed by our config names.

Source: Wu, Gao, Li, Wu, "Stable-LoRA: Stabilizing Feature Learning of Low-Rank Adaptation",
arXiv 2603.05204 (ICLR 2026), section 4 (Table 1 and the ablations). Accuracies are
in percent, overheads in percent of the LoRA (AdamW) wall clock. Models, tasks and methods use
the names of ``conf/model``, ``conf/task`` and ``conf/method``; target-module sets are the
sorted tuple of module names. Numbers the paper does not publish (per-task QA accuracies,
GSM8K except one cell) are absent, never filled in.
"""

from __future__ import annotations

#: The paper's baselines and method, in the column order of its tables.
PAPER_METHODS = ("lora", "loraplus", "riemann", "lora_rite", "stable_lora")
#: The paper's models, in the row order of its tables.
PAPER_MODELS = ("qwen2_0.5b", "llama3.2_1b", "qwen2_1.5b", "llama3.2_3b")
#: The five QA tasks whose average accuracy is Table 1.
QA_TASKS = ("hellaswag", "siqa", "obqa", "arc_easy", "arc_challenge")
#: The seven projections of a Llama/Qwen2 block ("all seven" in the target-module ablation).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Table 1: average accuracy (%) over the five QA tasks, each trained on separately;
#: best of three seeds. ``TABLE1_QA_AVERAGE[model][method]``.
TABLE1_QA_AVERAGE: dict[str, dict[str, float]] = {
    "qwen2_0.5b": {
        "lora": 61.94,
        "loraplus": 62.55,
        "riemann": 61.48,
        "lora_rite": 61.85,
        "stable_lora": 64.01,
    },
    "llama3.2_1b": {
        "lora": 71.90,
        "loraplus": 71.36,
        "riemann": 69.07,
        "lora_rite": 71.04,
        "stable_lora": 72.52,
    },
    "qwen2_1.5b": {
        "lora": 81.11,
        "loraplus": 81.02,
        "riemann": 80.25,
        "lora_rite": 81.08,
        "stable_lora": 81.95,
    },
    "llama3.2_3b": {
        "lora": 83.53,
        "loraplus": 83.42,
        "riemann": 82.91,
        "lora_rite": 83.32,
        "stable_lora": 84.03,
    },
}

#: GSM8K accuracy (%) after training on MetaMathQA, ``GSM8K[(model, steps)][method]``. Only
#: one cell was recovered; the paper states Stable-LoRA is above AdamW at 1000, 2000 and 5000.
GSM8K: dict[tuple[str, int], dict[str, float]] = {
    ("llama3.2_3b", 5000): {"lora": 58.83, "stable_lora": 59.44},
}

#: Stop-rule ablation (Stable-LoRA trained on the merged QA mixture, average accuracy %):
#: ``STOP_RULE_ABLATION[model][stop_rule]`` with our rule names (``norm``: the paper's rule,
#: ``never``: shrink for the whole run).
STOP_RULE_ABLATION: dict[str, dict[str, float]] = {
    "qwen2_0.5b": {"norm": 62.46, "never": 62.52},
    "llama3.2_1b": {"norm": 72.80, "never": 72.72},
    "qwen2_1.5b": {"norm": 80.75, "never": 80.61},
    "llama3.2_3b": {"norm": 84.13, "never": 84.10},
}

#: Target-module ablation on Llama-3.2-3B, merged QA (average accuracy %):
#: ``TARGET_MODULES_ABLATION[(model, task)][sorted modules][method]``.
TARGET_MODULES_ABLATION: dict[tuple[str, str], dict[tuple[str, ...], dict[str, float]]] = {
    ("llama3.2_3b", "merged_qa"): {
        ("q_proj", "v_proj"): {"lora": 83.79, "stable_lora": 84.13},
        ("k_proj", "o_proj", "q_proj", "v_proj"): {"lora": 84.54, "stable_lora": 84.93},
        tuple(sorted(ALL_PROJECTIONS)): {"lora": 85.31, "stable_lora": 85.60},
    }
}

#: Wall-clock overhead relative to LoRA (AdamW), Qwen2-0.5B on HellaSwag:
#: ``OVERHEAD[(model, task)][method]`` in percent; LoRA itself took 217.4 s. The paper reports
#: no extra memory for Stable-LoRA.
OVERHEAD_PERCENT: dict[tuple[str, str], dict[str, float]] = {
    ("qwen2_0.5b", "hellaswag"): {
        "lora": 0.0,
        "loraplus": 0.0,
        "riemann": 8.3,
        "lora_rite": 46.0,
        "stable_lora": 0.6,
    },
}
OVERHEAD_LORA_SECONDS: dict[tuple[str, str], float] = {("qwen2_0.5b", "hellaswag"): 217.4}
