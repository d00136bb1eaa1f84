"""eval.py: pass@k and accuracy against hand counts, grading plumbing, and the CLI on one and two ranks."""

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import torch

import eval as evaluation
import models
import rewards

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# -------------------------------------------------------------------------------------------------
# Numbers
# -------------------------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            verdicts = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(verdicts, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # Exact rational value 1 - C(n-c, k) / C(n, k) for binomials far beyond float range.
    n, c, k = 2000, 7, 900
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        evaluation.pass_at_k(4, 5, 1)


def test_pass_ks():
    assert evaluation.pass_ks(1) == [1]
    assert evaluation.pass_ks(6) == [1, 2, 4, 6]
    assert evaluation.pass_ks(16) == [1, 2, 4, 8, 16]


def test_summary_of_known_verdicts():
    T, F = True, False
    records = [
        {"subject": "Algebra", "level": 1, "correct": [T, F, F, T], "truncated": [F, F, T, F], "response_tokens": [10, 20, 30, 40]},
        {"subject": "Geometry", "level": 2, "correct": [F, F, F, F], "truncated": [F] * 4, "response_tokens": [5] * 4},
        {"subject": "Algebra", "level": "?", "correct": [T, T, T, T], "truncated": [T] * 4, "response_tokens": [1] * 4},
        {"subject": "Algebra", "level": 10, "correct": [F, F, F, T], "truncated": [F] * 4, "response_tokens": [1] * 4},
    ]
    out = evaluation.summarize(records)
    # By hand: 7 correct of 16 responses. pass@2 per problem: 1 - C(n-c,2)/C(4,2) = 5/6, 0, 1, 1 - 3/6.
    assert out["num_problems"] == 4 and out["samples"] == 4
    assert out["accuracy"] == pytest.approx(7 / 16)
    assert out["pass@1"] == pytest.approx(7 / 16)
    assert out["pass@2"] == pytest.approx((5 / 6 + 0 + 1 + 1 / 2) / 4)
    assert out["pass@4"] == pytest.approx(3 / 4)
    assert out["truncated"] == pytest.approx(5 / 16)
    assert out["response_tokens"] == pytest.approx((100 + 20 + 4 + 4) / 16)
    assert out["by_subject"] == {"Algebra": {"num_problems": 3, "accuracy": pytest.approx(7 / 12)},
                                 "Geometry": {"num_problems": 1, "accuracy": 0.0}}
    assert list(out["by_level"]) == ["1", "2", "10", "?"]
    assert [g["accuracy"] for g in out["by_level"].values()] == pytest.approx([0.5, 0.0, 0.25, 1.0])


def test_greedy_summary_has_no_pass_at_k_and_no_groups_without_fields():
    out = evaluation.summarize([{"correct": [True], "truncated": [False], "response_tokens": [3]},
                                {"correct": [False], "truncated": [True], "response_tokens": [5]}])
    assert out == {"num_problems": 2, "samples": 1, "accuracy": 0.5, "truncated": 0.5, "response_tokens": 4.0}


# -------------------------------------------------------------------------------------------------
# evaluate(): generation, grading and records, with a scripted generate_fn
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker():
    with rewards.AnswerChecker(1, 10.0) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_policy(tiny_paths):
    return models.load_model(str(tiny_paths["policy"])).eval()


def test_evaluate_grades_and_keys_results_by_problem(tiny_policy, tiny_tokenizer, checker):
    problems = [
        {"problem": "What is 6 times 7?", "answer": "42", "subject": "Prealgebra", "level": 1},
        {"problem": "Simplify $\\frac{6}{8}$.", "answer": "\\frac{3}{4}", "subject": "Prealgebra", "level": 2},
        {"problem": "What is 10 minus 4? Answer briefly.", "answer": "6", "subject": "Algebra", "level": 2},
    ]
    # Scripted responses, found by the prompt they answer: right (in another form), wrong, and truncated.
    scripted = {"What is 6 times 7?": ("So 6 \\cdot 7 = \\boxed{42}.", True),
                "Simplify $\\frac{6}{8}$.": ("Divide by 2: \\boxed{0.75}", True),
                "What is 10 minus 4? Answer briefly.": ("It is \\boxed{5} and", False)}
    eos = tiny_tokenizer.eos_token_id
    calls = []

    def generate_fn(model, prompt_ids, *, pad_id, stop_ids, max_new_tokens, temperature, greedy):
        calls.append(dict(n=len(prompt_ids), pad_id=pad_id, stop_ids=stop_ids, greedy=greedy))
        out = []
        for ids in prompt_ids:
            text = tiny_tokenizer.decode(ids)
            problem = next(p for p in scripted if p in text)
            response, ends = scripted[problem]
            out.append(tiny_tokenizer.encode(response, add_special_tokens=False) + ([eos] if ends else []))
        return out

    rng_before = torch.get_rng_state()
    result = evaluation.evaluate(tiny_policy, tiny_tokenizer, problems, checker=checker, batch_size=2,
                                 max_new_tokens=64, generate_fn=generate_fn)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [c["n"] for c in calls] == [2, 1] and all(c["greedy"] for c in calls)
    assert calls[0]["pad_id"] == tiny_tokenizer.pad_token_id
    assert calls[0]["stop_ids"] == models.stop_token_ids(tiny_policy, tiny_tokenizer)

    records = result["records"]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["problem"] for r in records] == [p["problem"] for p in problems]
    assert [r["extracted"] for r in records] == [["42"], ["0.75"], ["5"]]
    assert [r["correct"] for r in records] == [[True], [True], [False]]
    assert [r["truncated"] for r in records] == [[False], [False], [True]]
    assert records[0]["responses"] == ["So 6 \\cdot 7 = \\boxed{42}."]
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["by_subject"]["Prealgebra"]["accuracy"] == 1.0
    assert result["by_level"]["2"]["accuracy"] == 0.5
    assert result["answer_timeouts"] == 0


def test_evaluate_sampling_is_seeded_per_batch(tiny_policy, tiny_tokenizer, checker):
    problems = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    kwargs = dict(checker=checker, samples=2, temperature=1.0, max_new_tokens=6, batch_size=4)
    torch.manual_seed(123)
    first = evaluation.evaluate(tiny_policy, tiny_tokenizer, problems, **kwargs)
    torch.manual_seed(456)  # the caller's RNG state does not matter, the seed does
    second = evaluation.evaluate(tiny_policy, tiny_tokenizer, problems, **kwargs)
    assert [r["responses"] for r in first["records"]] == [r["responses"] for r in second["records"]]
    assert all(len(r["responses"]) == 2 and None not in r["responses"] for r in first["records"])
    assert {"pass@1", "pass@2"} <= set(first)
    other = evaluation.evaluate(tiny_policy, tiny_tokenizer, problems, **kwargs, seed=1)
    assert [r["responses"] for r in other["records"]] != [r["responses"] for r in first["records"]]
    with pytest.raises(ValueError, match="greedy"):
        evaluation.evaluate(tiny_policy, tiny_tokenizer, problems, **{**kwargs, "temperature": 0.0})


# -------------------------------------------------------------------------------------------------
# The command line, one process and two gloo ranks
# -------------------------------------------------------------------------------------------------


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in evaluation.EvalConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        evaluation.parse_config(["--samples", "4"])
    assert "--samples 4 with --temperature 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.parse_config(["--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.parse_config(["--model", "./no/such/model"])
    assert "--model: no such folder" in capsys.readouterr().err
    assert evaluation.parse_config(["--limit", "3"]).limit == 3


def test_bad_data_is_named_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"--data .*rows.jsonl.*row 1 \(line 2\)"):
        evaluation.main(["--model", str(tmp_path), "--data", str(FIXTURES / "bad" / "rows.jsonl")])


def test_an_unreachable_hub_model_ends_in_one_line_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"--model: could not load 'nobody/no-such-model'.*--preset tiny"):
        evaluation.main(["--model", "nobody/no-such-model", "--data", str(FIXTURES / "math500" / "test.jsonl"),
                         "--output-dir", str(tmp_path)])


DATA = f"{FIXTURES / 'math500' / 'test.jsonl'},{FIXTURES / 'local' / 'problems.jsonl'}"


def eval_flags(policy: Path, out: Path, mode: list[str]) -> list[str]:
    return ["--model", str(policy), "--data", DATA, "--max-new-tokens", "8", "--batch-size", "2",
            "--answer-workers", "1", "--output-dir", str(out), *mode]


def read_run(out: Path):
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    return results, records


@pytest.mark.parametrize("mode", [[], ["--samples", "2", "--temperature", "1.0"]], ids=["greedy", "sampled"])
def test_cli_single_process_and_two_ranks_agree(tiny_paths, tmp_path, mode):
    evaluation.main(eval_flags(tiny_paths["policy"], tmp_path / "one", mode))
    one, one_records = read_run(tmp_path / "one")
    samples = 2 if mode else 1
    assert one["num_problems"] == 9 and one["samples"] == samples and one["skipped_rows"] == 0
    assert [r["index"] for r in one_records] == list(range(9))
    assert all(len(r["responses"]) == samples and None not in r["responses"] for r in one_records)
    gold = [json.loads(line)["answer"] for line in (FIXTURES / "math500" / "test.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in one_records][:6] == gold
    assert set(one["by_subject"]) == {"Prealgebra", "Algebra", "Number Theory", "Intermediate Algebra"}
    assert ("pass@2" in one) == (samples == 2)

    # 9 problems x samples in batches of 2: the ranks get unequal numbers of batches (one repeats a batch).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
         *eval_flags(tiny_paths["policy"], tmp_path / "two", mode)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    two, two_records = read_run(tmp_path / "two")
    assert two_records == one_records  # same responses, verdicts and order, problem by problem
    assert {k: v for k, v in two.items() if k != "config"} == {k: v for k, v in one.items() if k != "config"}
