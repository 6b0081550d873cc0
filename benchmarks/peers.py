"""The project side by side with its peers, measured in one run: training speed against
transformers' ``Trainer`` + peft and TRL's ``SFTTrainer``, scoring speed against
lm-evaluation-harness; one table of ratios.

Training. Four trainers, each with its own copy of the same model (built as the runner builds
it: ``build_run`` after the same seeding, so the same LoRA r8 on q_proj/v_proj init), the same
optimizer (the run's Stable-LoRA, options and linear schedule; the peers get it through
``optimizers=(optimizer, scheduler)`` and :class:`StableLoRACallback` logs its shrink state, as
docs/integrations.md shows) and the same examples in the same order (the runner's
length-grouped stream; the peers read it with a sequential sampler), batch 8:

- ``project``: the runner's step (``runner_step.RunnerLoop``: ``train_step`` with the head at
  label positions only, then the optimizer step as in ``train()``);
- ``Trainer``: ``transformers.Trainer`` on the peft model, ``DataCollatorForSeq2Seq`` (pads
  to the batch's longest), the model's own loss (full LM head);
- ``SFTTrainer``: TRL's default collator with completion-only loss (the dataset is the
  runner's tokenization, ``input_ids`` + ``completion_mask``, so every trainer sees the same
  tokens), TRL's chunked LM head;
- ``SFTTrainer padding-free``: the same with ``padding_free=True`` (one flattened sequence,
  no padding; ``--packing`` puts the project on its own packed batches, ``trainer.packing``).

Every loss is the mean cross-entropy over the batch's completion tokens (answer + EOS); the
first ``--loss-steps`` steps' losses of each peer are compared with the project's (the max
absolute difference is printed: a check that the trainers compute the same thing, not a
timing). Timing: ``--repeats`` rounds of ``--steps`` steps per trainer, interleaved (A, B, C,
D, A, B, ...) after a warm-up round (the one the losses come from); a round's time runs from
the end of its first step to the end of its last (each trainer's start-up is left out; data
loading, collation, callbacks and logging are in); medians. Rates are real (non-padding)
tokens per second, by the process's CPU time and by the wall clock (CPU time: a shared
machine's other jobs do not count; on CUDA only the wall clock, synchronised).

Scoring. The trained project model is scored on ``--eval-examples`` questions of each task by
the project's evaluation (``task.evaluate``, as the runner's evaluation: head at continuations,
each context once) and by lm-evaluation-harness (``HFLM`` around the same model, the way
``python -m stablelora.lm_eval`` builds it, over a local task YAML holding the same questions
and choices), with the same batch size and precision (bf16 autocast on CUDA for both, as the
runner), interleaved, medians: seconds per question and the largest difference of any
choice's log-likelihood between the two.

The ratio column is always project speed / peer speed (above 1: the project is faster).

    python benchmarks/peers.py                                      # SmolLM2-135M, BBC News
    python benchmarks/peers.py --tasks bbc_news arc_easy --data-root /path/to/data
    python benchmarks/peers.py --model tiny_llama --steps 3 --repeats 1 --eval-examples 4

ARC-Easy needs ``--data-root`` (local Hub-schema copies: ``<root>/arc_easy/*.jsonl``); without
it that task is skipped with one line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars (read at tqdm's import)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runner_step import (  # noqa: E402
    MODELS,
    Clock,
    RunnerLoop,
    build,
    clocks,
    compose,
    elapsed,
    overrides,
    real_tokens,
    step_examples,
    uses_bf16,
)

PEERS = ("Trainer", "SFTTrainer", "SFTTrainer padding-free")
TASKS = ("bbc_news", "arc_easy")
#: Tasks read from ``--data-root`` (skipped without it).
NEEDS_DATA_ROOT = {"arc_easy"}


@dataclass
class Row:
    task: str
    what: str
    project: str
    peer: str
    ratio: str


@dataclass
class TrainerResult:
    """One trainer's losses (warm-up round) and per-round times of steps 2..N."""

    losses: list[float] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: {"cpu": [], "wall": []})

    def add(self, times: dict[str, float]) -> None:
        for clock, seconds in times.items():
            self.times[clock].append(seconds)

    def median(self, clock: str) -> float:
        return statistics.median(self.times[clock])


# ---------------------------------------------------------------------------- the project
class ProjectTrainer:
    name = "project"

    def __init__(self, run, steps: int):
        self.loop, self.steps, self.clock = RunnerLoop.of(run), steps, Clock(run.dist.device)
        self.result = TrainerResult()

    def round(self, record_losses: bool) -> None:
        self.loop.run.model.train()
        start = None
        for step in range(1, self.steps + 1):
            loss, _ = self.loop.step(step)
            if record_losses:
                self.result.losses.append(loss)
            if step == 1:
                start = self.clock.now()
        if not record_losses:
            self.result.add(elapsed(start, self.clock.now()))


# ---------------------------------------------------------------------------- the peers
def _timing_callback(clock: Clock, steps: int, marks: list):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """The clocks at the end of step 1 and of step ``steps`` (after every other
        callback's ``on_step_end``: it is added last)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, steps):
                marks.append(clock.now())

    return Timing()


class PeerTrainer:
    """A transformers / TRL trainer over its own Run's model, optimizer and schedule."""

    def __init__(self, name: str, run, examples: list[list[int]], output: Path, probe: bool):
        from transformers import PrinterCallback

        from stablelora.integrations.hf import StableLoRACallback

        self.name, self.run, self.steps = name, run, len(examples)
        self.clock, self.result, self.marks = Clock(run.dist.device), TrainerResult(), []
        self.recording = False
        flat = [i for indices in examples for i in indices]
        encoded = [run.task.encode_train(i) for i in flat]
        callback = (
            StableLoRACallback(
                probe_every=run.cfg.probe.every, probe_first_steps=run.cfg.probe.first_steps
            )
            if probe
            else StableLoRACallback()
        )
        callbacks = [callback, _timing_callback(self.clock, self.steps, self.marks)]
        common = self._arguments(output)
        if name == "Trainer":
            self.trainer = self._trainer(encoded, common, callbacks)
        else:
            self.trainer = self._sft_trainer(encoded, common, callbacks, "padding-free" in name)
        compute_loss = self.trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            loss = compute_loss(model, inputs, *args, **kwargs)
            if self.recording:
                self.result.losses.append(loss.detach())  # read after the round: no sync
            return loss

        self.trainer.compute_loss = recording_compute_loss
        self.trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line

    def _arguments(self, output: Path) -> dict:
        cfg, device = self.run.cfg, self.run.dist.device
        return dict(
            output_dir=str(output),
            max_steps=self.steps,
            per_device_train_batch_size=cfg.trainer.batch_size,
            logging_steps=cfg.trainer.log_every,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            max_grad_norm=cfg.optim.max_grad_norm or 0.0,
            bf16=uses_bf16(self.run),
            use_cpu=device.type == "cpu",
            seed=cfg.seed,
            train_sampling_strategy="sequential",  # the runner's order, as given
            activation_checkpointing=False,  # the runner's default (TRL defaults to on)
            dataloader_num_workers=0,
        )

    def _trainer(self, encoded, arguments: dict, callbacks):
        from datasets import Dataset
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        tokenizer = self.run.task.tokenizer
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
        return Trainer(
            model=self.run.model,
            args=TrainingArguments(**arguments),
            train_dataset=Dataset.from_list(rows),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            optimizers=(self.run.optimizer, self.run.scheduler),
            callbacks=callbacks,
        )

    def _sft_trainer(self, encoded, arguments: dict, callbacks, padding_free: bool):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = [
            {"input_ids": ids, "completion_mask": [int(label != -100) for label in labels]}
            for ids, labels in encoded
        ]
        config = SFTConfig(
            **arguments,
            completion_only_loss=True,
            padding_free=padding_free,
            max_length=None,  # already cut to task.max_length by the runner's tokenization
        )
        return SFTTrainer(
            model=self.run.model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=self.run.task.tokenizer,
            optimizers=(self.run.optimizer, self.run.scheduler),
            callbacks=callbacks,
        )

    def round(self, record_losses: bool) -> None:
        self.marks.clear()
        self.recording = record_losses
        self.trainer.train()
        self.recording = False
        if record_losses:
            self.result.losses = [float(loss) for loss in self.result.losses]
        else:
            self.result.add(elapsed(*self.marks))


# ---------------------------------------------------------------------------- training
def bench_training(task_name: str, args, output: Path) -> tuple[list[Row], object]:
    """The training rows of one task, and the project's Run (trained: its model is scored)."""
    total = args.steps * (args.repeats + 1)  # one linear schedule over every round

    def config(probe: bool, packing: bool = False):
        return compose(
            overrides(
                args.model,
                task_name,
                max_steps=total,
                batch_size=args.batch_size,
                device=args.device,
                data_root=args.data_root,
                probe=probe,
                packing=packing,
            )
        )

    project_run = build(config(args.probe, args.packing))
    examples = step_examples(project_run, args.steps)
    tokens = real_tokens(project_run, examples[1:])  # the timed steps: 2..N
    trainers: list = [ProjectTrainer(project_run, args.steps)]
    peer_cfg = config(probe=False)  # the peers' probe is the callback's
    for name in args.peers:
        output_dir = output / name.replace(" ", "_")
        trainers.append(PeerTrainer(name, build(peer_cfg), examples, output_dir, args.probe))
    for trainer in trainers:  # warm-up round; its losses are the check
        trainer.round(record_losses=True)
    for _ in range(args.repeats):
        for trainer in trainers:
            trainer.round(record_losses=False)

    project = trainers[0].result
    device = project_run.dist.device
    k = min(args.loss_steps, args.steps)
    rows = []
    for trainer in trainers[1:]:
        peer = trainer.result
        for clock in clocks(device):
            ours, theirs = tokens / project.median(clock), tokens / peer.median(clock)
            rows.append(
                Row(
                    task_name,
                    f"training tok/s ({clock}) vs {trainer.name}",
                    f"{ours:.0f}",
                    f"{theirs:.0f}",
                    f"{ours / theirs:.2f}x",
                )
            )
        diff = max(abs(a - b) for a, b in zip(project.losses[:k], peer.losses[:k]))
        rows.append(
            Row(
                task_name,
                f"loss, steps 1-{k}, max abs difference vs {trainer.name}",
                " ".join(f"{loss:.4f}" for loss in project.losses[:k]),
                " ".join(f"{loss:.4f}" for loss in peer.losses[:k]),
                f"{diff:.1e}",
            )
        )
    padded = sum(
        len(indices) * max(project_run.task.train_length(i) for i in indices)
        for indices in examples[1:]
    )
    print(
        f"\n{task_name}: {args.steps} steps x batch {args.batch_size} per round (steps 2-"
        f"{args.steps} timed: {tokens} real tokens, {1 - tokens / padded:.1%} padding in the "
        f"runner's batches; the project on {'packed' if trainers[0].loop.packed else 'padded'} "
        f"batches), median of {args.repeats} interleaved rounds after a warm-up round"
    )
    return rows, project_run


# ---------------------------------------------------------------------------- scoring
#: lm-eval task over a local JSON Lines file of the project's own questions and choices.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
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


def lm_eval_task(task, examples, folder: Path) -> str:
    """Write the task YAML and its data (the questions ``task.evaluate`` scores); its name."""
    from stablelora.tasks.prompts import multiple_choice_requests

    name = f"peers_{task.name}"
    data = folder / f"{name}.jsonl"
    with data.open("w") as out:
        for example in examples:
            context, choices = multiple_choice_requests(example, task.cfg.prompt_format)
            out.write(json.dumps({"query": context, "choices": choices, "gold": example.gold}))
            out.write("\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return name


def bench_scoring(task_name: str, run, args, output: Path) -> list[Row]:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task, model = run.task, run.model
    if len(task.eval_sets) != 1:
        raise ValueError(f"{task_name}: one eval set expected, got {list(task.eval_sets)}")
    examples = next(iter(task.eval_sets.values()))[: args.eval_examples]
    folder = output / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    name = lm_eval_task(task, examples, folder)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    task_dict = manager.load([name])
    lm = HFLM(
        pretrained=model,
        tokenizer=task.tokenizer,
        batch_size=args.eval_batch_size,
        device=str(run.dist.device),
        mixed_precision_dtype=torch.bfloat16 if uses_bf16(run) else None,
    )
    # as evaluate() calls it, without the progress bars
    lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    clock = Clock(run.dist.device)
    n = len(examples)

    def ours() -> list[list[float]]:
        with run.autocast():
            task.evaluate(model, batch_size=args.eval_batch_size, max_examples=n)
        return [row["loglik"] for row in task.last_examples]

    def theirs() -> list[list[float]]:
        results = evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        samples = sorted(results["samples"][name], key=lambda sample: sample["doc_id"])
        return [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]

    scores = {"project": ours(), "lm-eval": theirs()}  # warm-up; the check
    times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in scores}
    for _ in range(args.repeats):
        for key, fn in (("project", ours), ("lm-eval", theirs)):
            start = clock.now()
            fn()
            for c, seconds in elapsed(start, clock.now()).items():
                times[key][c].append(seconds)
    worst = max(
        abs(a - b)
        for mine, other in zip(scores["project"], scores["lm-eval"], strict=True)
        for a, b in zip(mine, other, strict=True)
    )
    choices = sum(len(lls) for lls in scores["project"])
    rows = []
    for c in clocks(run.dist.device):
        ours_s = statistics.median(times["project"][c]) / n
        theirs_s = statistics.median(times["lm-eval"][c]) / n
        rows.append(
            Row(
                task_name,
                f"scoring s/question ({c}) vs lm-eval HFLM",
                f"{ours_s:.4f}",
                f"{theirs_s:.4f}",
                f"{theirs_s / ours_s:.2f}x",
            )
        )
    rows.append(
        Row(
            task_name,
            f"choice log-likelihood, max abs difference vs lm-eval ({n} questions, {choices} "
            "choices)",
            "",
            "",
            f"{worst:.1e}",
        )
    )
    return rows


# ---------------------------------------------------------------------------- main
def print_table(rows: list[Row]) -> None:
    print("| task | what | project | peer | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.task} | {row.what} | {row.project} | {row.peer} | {row.ratio} |")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", choices=MODELS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--data-root", default=None, help="local Hub-schema copies (ARC-Easy)")
    parser.add_argument("--steps", type=int, default=8, help="steps per round (at least 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per trainer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loss-steps", type=int, default=4, help="steps whose losses agree")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--parts", nargs="+", default=["train", "score"], choices=["train", "score"]
    )
    parser.add_argument("--probe", action="store_true", help="the feature probe on, everywhere")
    parser.add_argument(
        "--packing", action="store_true", help="the project on packed batches (trainer.packing)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be at least 2 and --repeats at least 1")
    return args


def quiet() -> None:
    """The libraries' progress bars, deprecation notes and start-up lines off: the table is
    the output."""
    import logging
    import warnings

    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lm_eval", "transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> list[Row]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for task_name in args.tasks:
            if task_name in NEEDS_DATA_ROOT and not args.data_root:
                print(f"{task_name}: skipped (no --data-root with a local copy of its data)")
                continue
            output = Path(folder) / task_name
            run = None
            if "train" in args.parts:
                task_rows, run = bench_training(task_name, args, output)
                rows += task_rows
            if "score" in args.parts:
                if run is None:  # the untrained adapter
                    cfg = compose(
                        overrides(args.model, task_name, max_steps=1, device=args.device,
                                  data_root=args.data_root)
                    )  # fmt: skip
                    run = build(cfg)
                rows += bench_scoring(task_name, run, args, output)
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    name = (
        torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"\n{args.model}, LoRA r8 q/v, Stable-LoRA, batch {args.batch_size}; {device} "
        f"({name}); ratio = project speed / peer speed"
    )
    print_table(rows)
    return rows


if __name__ == "__main__":
    quiet()
    main()
