"""prm.py: Math-Shepherd labels against a hand-computed case, AUC against a pairwise loop, the Math-Shepherd
layout, label -> train -> ppo on the CI-size toy warm start (resume, refusals, the folder read as StepTagPRM
against a full LM forward), 2 ranks against 1 process, and best-of-N against a hand-made case."""

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_distributed import launch

import models
import prm
import rewards
import toy

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def boxed_grade(texts, gold):
    return [rewards.extract_boxed(text) == gold for text in texts]


def test_label_problem_by_hand():
    problem = {"problem_id": 7, "problem": "(1+1)+3", "answer": "5"}
    solutions = [("1+1=2\n\n2+3=5\n\n\\boxed{5}", False),  # right: two prefixes are completed
                 ("1+1=2\n\n2+3=5", True),  # truncated: dropped
                 ("\n\n", False),  # no steps: dropped
                 ("1+1=3\n\n\\boxed{6}", False)]  # wrong: one prefix
    completions = {"1+1=2\n\n": [("2+3=5\n\n\\boxed{5}", False), ("\\boxed{4}", False),
                                 ("2+3=5\n\n\\boxed{5}", True), ("2+3=5\n\n\\boxed{5}", False)],
                   "1+1=2\n\n2+3=5\n\n": [("\\boxed{5}", False)] * 4,
                   "1+1=3\n\n": [("\\boxed{6}", False)] * 3 + [("3+3=6\n\n\\boxed{5}", False)]}
    asked = []

    def complete(prefixes):
        asked.extend(prefixes)
        return [completions[p] for p in prefixes]

    rows, dropped = prm.label_problem(problem, solutions, complete, boxed_grade, "\n\n")
    assert asked == ["1+1=2\n\n", "1+1=2\n\n2+3=5\n\n", "1+1=3\n\n"]  # the last step's prefix is never completed
    assert dropped == {"truncated": 1, "no_steps": 1}
    assert [r["steps"] for r in rows] == [["1+1=2", "2+3=5", "\\boxed{5}"], ["1+1=3", "\\boxed{6}"]]
    # 2 of 4 completions succeed (a right but truncated one does not), then 4 of 4, then the solution itself
    assert rows[0]["soft_labels"] == [0.5, 1.0, 1.0] and rows[0]["hard_labels"] == [1, 1, 1] and rows[0]["correct"]
    assert rows[1]["soft_labels"] == [0.25, 0.0] and rows[1]["hard_labels"] == [1, 0] and not rows[1]["correct"]
    assert all(r["problem_id"] == 7 and r["answer"] == "5" for r in rows)


def test_auc_against_a_pairwise_loop():
    assert prm.auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == 0.875
    assert math.isnan(prm.auc([0.3, 0.6], [1, 1]))
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(15)]
        labels = [rng.random() < 0.6 for _ in scores]
        pairs = [(g, b) for g, b in itertools.product(range(15), range(15)) if labels[g] and not labels[b]]
        if pairs:
            expected = sum(1.0 if scores[g] > scores[b] else 0.5 if scores[g] == scores[b] else 0.0
                           for g, b in pairs) / len(pairs)
            assert prm.auc(scores, labels) == pytest.approx(expected)


def test_math_shepherd_layout_and_its_errors():
    examples = prm.read_examples(str(FIXTURES / "math_shepherd"), soft=False)
    assert len(examples) == 6 and len({e.problem for e in examples}) == 3
    second = examples[1]
    assert second.problem == "Tom has 3 apples and buys 4 more. How many apples does he have?"
    assert second.hard == [1, 0, 0] and second.steps[0] == "Step 1: Tom starts with 3 apples."
    assert all(second.text[end - 2:end] == "ки" for end in second.ends)
    # the same text our own rows would make for those steps
    assert rewards.step_tag_text(second.problem, second.steps)[0] == second.text
    with pytest.raises(SystemExit, match="row 3: its label has 'x', not \\+ or -, where its input has step tag 1"):
        prm.math_shepherd_example("q Step 1: a ки", "q Step 1: a x", "row 3")
    with pytest.raises(SystemExit, match="row 4: its input has no step tag"):
        prm.math_shepherd_example("q Step 1: a", "q Step 1: a", "row 4")


def test_prefix_correct_by_hand():
    steps = [["3+4=7", "7+0=7", "7*2=14", "\\boxed{14}"], ["3+4=8", "8*2=16", "\\boxed{16}"],
             ["3+4=7", "\\boxed{7}"], ["3+4=7", "7*2=14", "14*1=15"]]
    assert toy.prefix_correct(["(3+4)*2"] * 4, steps) == [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0],
                                                          [1.0, 1.0, 0.0]]


def label_flags(policy, out, *extra):
    return ["label", "--model", str(policy), "--data", "toy", "--problems", "6", "--samples", "2", "--completions",
            "2", "--max-new-tokens", "48", "--temperature", "1.0", "--answer-workers", "1", "--output-dir", str(out),
            *extra]


def train_flags(policy, labels, out, *extra):
    return ["train", "--model", str(policy), "--labels", str(labels), "--epochs", "2", "--lr", "1e-3",
            "--batch-tokens", "512", "--heldout-fraction", "0.34", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def labelled(toy_ci_policy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels")
    prm.main(label_flags(toy_ci_policy, out))
    return out


def test_label_rows_resume_and_refusals(labelled, toy_ci_policy):
    rows = [json.loads(line) for line in (labelled / "labels.jsonl").read_text().splitlines()]
    assert rows and {r["problem_id"] for r in rows} <= set(range(6))
    problems = toy.problems(6, 0, "train", 2, 3)
    for r in rows:
        assert r["problem"] == problems[r["problem_id"]]["problem"] and r["answer"] == problems[r["problem_id"]]["answer"]
        assert len(r["steps"]) == len(r["soft_labels"]) == len(r["hard_labels"])
        assert r["soft_labels"][-1] == float(r["correct"])  # the last prefix is the solution itself
        assert all(s in (0.0, 0.5, 1.0) and h == int(s > 0) for s, h in zip(r["soft_labels"], r["hard_labels"]))
    before = (labelled / "labels.jsonl").read_text()
    shard = labelled / "labels.rank0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-2]) + lines[-2][:20])  # the last problem lost, the one before it torn
    prm.main(label_flags(toy_ci_policy, labelled))  # redoes the two, as they were
    assert (labelled / "labels.jsonl").read_text() == before
    with pytest.raises(SystemExit, match="^--completions: the labels in .* were made with 2, not 3"):
        prm.main(label_flags(toy_ci_policy, labelled, "--completions", "3"))


def test_train_writes_a_folder_ppo_loads(labelled, toy_ci_policy, tmp_path):
    import ppo

    prm.main(train_flags(toy_ci_policy, labelled / "labels.jsonl", tmp_path))
    metrics = [json.loads(line) for line in (tmp_path / "prm-metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["heldout_accuracy"] <= 1 for m in metrics)
    folder = tmp_path / "prm"
    scorer = prm.load_scorer(str(folder))
    assert isinstance(scorer, rewards.StepTagPRM)  # the format detected from the folder: step_tag
    # The adapter's P(good) against a full LM forward, by hand: softmax over the + and - logits at each tag.
    problem, steps = "(3+4)*2", ["3+4=7", "7*2=15", "\\boxed{15}"]
    model = models.load_model(str(folder))
    tok = models.load_tokenizer(str(folder))
    text, ends = rewards.step_tag_text(problem, steps)
    encoding = tok(text, return_offsets_mapping=True)
    positions = [t for t, (_, end) in enumerate(encoding["offset_mapping"]) if end in ends]
    logits = model(torch.tensor([encoding["input_ids"]])).logits[0, positions]
    plus, minus = tok.convert_tokens_to_ids(["+", "-"])
    expected = logits[:, [plus, minus]].softmax(-1)[:, 0].tolist()
    assert scorer([problem], [steps])[0] == pytest.approx(expected, abs=1e-5)
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    labels = [json.loads(line) for line in (labelled / "labels.jsonl").read_text().splitlines()]
    held_problems = {r["problem"] for r in held}
    assert held and held == [r for r in labels if r["problem"] in held_problems]  # every solution of a held problem
    assert len(held_problems) < len({r["problem"] for r in labels})
    ppo.main(["--preset", "toy", "--model", str(toy_ci_policy), "--prm", str(folder), "--reward", "clip_delta",
              "--steps", "1", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--answer-workers", "1",
              "--output-dir", str(tmp_path / "ppo")])
    step = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["reward/process"] <= 0  # clip_delta: a telescoped sum of clipped scores, never positive


def test_math_shepherd_fixture_trains(tiny_paths, tmp_path):
    prm.main(["train", "--model", str(tiny_paths["policy"]), "--labels", str(FIXTURES / "math_shepherd"),
              "--epochs", "4", "--lr", "1e-3", "--batch-tokens", "64", "--heldout-fraction", "0.34",
              "--output-dir", str(tmp_path)])
    metrics = [json.loads(line) for line in (tmp_path / "prm-metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert isinstance(prm.load_scorer(str(tmp_path / "prm")), rewards.StepTagPRM)


def test_two_ranks_label_and_train_as_one_process(labelled, toy_ci_policy, tmp_path):
    launch(["prm.py", *label_flags(toy_ci_policy, tmp_path / "two")], 2, timeout=600)
    assert (tmp_path / "two" / "labels.jsonl").read_text() == (labelled / "labels.jsonl").read_text()
    prm.main(train_flags(toy_ci_policy, labelled / "labels.jsonl", tmp_path / "one-train"))
    launch(["prm.py", *train_flags(toy_ci_policy, labelled / "labels.jsonl", tmp_path / "two-train")], 2,
           timeout=600)
    one, two = ([json.loads(line) for line in (tmp_path / run / "prm-metrics.jsonl").read_text().splitlines()]
                for run in ("one-train", "two-train"))
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "heldout_loss", "heldout_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_best_of_n_by_hand(monkeypatch, tmp_path):
    """One problem, five solutions scored by the step verifier (0.9 right, 0.1 wrong, 0.5 boxed):
    a right [.9 .9 .5], b and c wrong [.1 .9 .5], d right with a padding step [.9 .9 .9 .5], e a lone wrong box."""
    texts = ["3+4=7\n\n7*2=14\n\n\\boxed{14}", "3+4=8\n\n8*2=16\n\n\\boxed{16}", "3+4=8\n\n8*2=16\n\n\\boxed{16}",
             "3+4=7\n\n7+0=7\n\n7*2=14\n\n\\boxed{14}", "\\boxed{16}"]

    class Scripted:
        def __init__(self, *args):
            pass

        def __call__(self, problem, prefixes, n):
            assert prefixes == [""] and n == 5
            return [[(text, False) for text in texts]]

    monkeypatch.setattr(prm, "Sampler", Scripted)
    monkeypatch.setattr(prm, "load_problems", lambda *args: [{"problem": "(3+4)*2", "answer": "14"}])
    prm.main(["evaluate", "--preset", "toy", "--model", "scripted", "--prm", "toy:step_verifier", "--bon-samples", "5",
                       "--answer-workers", "1", "--output-dir", str(tmp_path)])
    accuracy = json.loads((tmp_path / "prm-eval.json").read_text())["best_of_n"]["accuracy"]
    # min: a, d and e tie at 0.5, the first (a) is right; product: e (0.5) beats a (0.405), wrong; last: all
    # 0.5, a first; majority: 16 has 3 votes, wrong; a random sample is right 2/5 of the time.
    assert accuracy == {"random sample": 0.4, "majority vote": 0.0, "min": 1.0, "product": 0.0, "last": 1.0,
                        "pass@N": 1.0}
