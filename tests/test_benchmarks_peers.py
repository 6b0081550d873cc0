"""benchmarks/peers.py and benchmarks/shape_limit.py end to end at tiny size: the tables'
structure, and the properties that make the comparisons sound (the trainers' first losses
agree, the project and lm-eval score the same log-likelihoods, a step's shape limit is
positive and below the measured step). Never a speed."""

from __future__ import annotations

import re
import sys

import pytest
from helpers import ROOT, TASK_FIXTURES

sys.path.insert(0, str(ROOT))

#: The trainers agree to float32 rounding on the same examples, loss and optimizer.
LOSS_TOLERANCE = 1e-4


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table under ``header`` (its first line) in ``text``."""
    lines = text.splitlines()
    start = lines.index(header)
    assert lines[start + 1].startswith("|---")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow  # four tiny trainers and lm-eval: 20-50 s on 2 shared cores
def test_peers_table_and_the_trainers_first_losses_agree(capsys, one_thread):
    pytest.importorskip("trl")
    pytest.importorskip("lm_eval")
    from benchmarks import peers

    argv = ["--model", "tiny_llama", "--tasks", "bbc_news", "arc_easy", "--steps", "2",
            "--repeats", "1", "--eval-examples", "4", "--device", "cpu"]  # fmt: skip
    rows = peers.main(argv)
    out = capsys.readouterr().out
    # ARC-Easy needs --data-root: one line, and no rows
    assert "arc_easy: skipped (no --data-root with a local copy of its data)" in out
    table = table_rows(out, "| task | what | project | peer | ratio |")
    assert [[r.task, r.what, r.project, r.peer, r.ratio] for r in rows] == table
    assert {row[0] for row in table} == {"bbc_news"}
    whats = [row[1] for row in table]
    for peer in peers.PEERS:
        for clock in ("cpu", "wall"):
            assert f"training tok/s ({clock}) vs {peer}" in whats
        assert f"loss, steps 1-2, max abs difference vs {peer}" in whats
    for clock in ("cpu", "wall"):
        assert f"scoring s/question ({clock}) vs lm-eval HFLM" in whats
    assert len(table) == 3 * 3 + 3

    for _, what, project, peer, ratio in table:
        if what.startswith(("training", "scoring")):  # rates: positive, ratio = ours / theirs
            assert float(project) > 0 and float(peer) > 0
            assert ratio.endswith("x") and float(ratio[:-1]) > 0
        elif what.startswith("loss"):  # the same loss values, step by step
            ours, theirs = [float(x) for x in project.split()], [float(x) for x in peer.split()]
            assert len(ours) == len(theirs) == 2
            assert ours == pytest.approx(theirs, abs=LOSS_TOLERANCE)
            assert float(ratio) <= LOSS_TOLERANCE, what
        else:  # the same per-choice log-likelihoods as lm-eval
            assert what.startswith("choice log-likelihood") and "(4 questions, 20 choices)" in what
            assert float(ratio) <= 1e-4


def test_shape_limit_is_below_the_step_and_the_profile_adds_up(capsys, one_thread):
    from benchmarks import shape_limit

    argv = ["--model", "tiny_llama", "--tasks", "arc_easy", "--data-root", str(TASK_FIXTURES),
            "--steps", "2", "--repeats", "1", "--matmul-repeats", "1", "--device", "cpu"]  # fmt: skip
    (result,) = shape_limit.main(argv)
    out = capsys.readouterr().out
    limit = result["limit"]
    assert 0 < limit.total < result["measured"]["probe off"]  # the step does all this and more
    assert limit.total < result["measured"]["probe default"]
    parts = table_rows(out, "| part | s/step | share of the limit |")
    names = [row[0] for row in parts]
    # what the step computes, and only that: no weight gradient for the frozen base or head
    assert "base linears: grad weight" not in names and "lm_head: grad weight" not in names
    for part in ("base linears: forward", "base linears: grad input", "LoRA A/B: forward",
                 "LoRA A/B: grad input", "LoRA A/B: grad weight",
                 "attention (sdpa): forward + backward", "lm_head: forward", "lm_head: grad input",
                 "limit: matmuls and attention alone", "measured step, probe off",
                 "measured step, probe default"):  # fmt: skip
        assert part in names
    assert float(parts[names.index("limit: matmuls and attention alone")][1]) > 0
    for row in parts:
        if row[0].startswith("measured step"):
            assert float(row[2].split()[-1]) > 1  # step / limit

    profile = table_rows(out, "| group | ms | % of step |")
    assert [row[0] for row in profile] == list(shape_limit.GROUPS)
    shares = [float(row[2].rstrip("%")) for row in profile]
    assert all(share >= 0 for share in shares)
    assert sum(shares) == pytest.approx(100, abs=0.6)  # every op's own time in one group
    for group in ("LoRA rank-8 matmuls", "base matmuls", "lm_head", "softmax/attention", "probe"):
        assert shares[list(shape_limit.GROUPS).index(group)] > 0, group

    summary = table_rows(out, "| task | limit s/step | step s/step, probe off | step / limit |")
    assert [row[0] for row in summary] == ["arc_easy"]
    assert float(summary[0][3]) == pytest.approx(
        result["measured"]["probe off"] / limit.total, rel=0.01
    )
    assert re.search(r"linears' matmuls run at [\d.]+ GFLOP/s", out)
