"""data.py: every source layout through the same loader, gold answers, bad rows, prompts, resumable order.

The named sources are pointed at folders in tests/fixtures/ that copy the hub layouts (a dataset card with
`configs:`), so `datasets.load_dataset` runs exactly as on the hub, without a network.
"""

import dataclasses
import json
import logging
from pathlib import Path

import pytest

import data

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def local_hub(monkeypatch):
    """Point the named sources at their fixture folders; returns a function to point one elsewhere."""

    def point(name: str, folder: Path):
        monkeypatch.setitem(data.SOURCES, name, dataclasses.replace(data.SOURCES[name], hub_id=str(folder)))

    point("gsm8k", FIXTURES / "gsm8k")
    point("math", FIXTURES / "hendrycks_math")
    point("math500", FIXTURES / "math500")
    return point


# -------------------------------------------------------------------------------------------------
# Source layouts
# -------------------------------------------------------------------------------------------------


def test_gsm8k_gold_is_the_number_after_hashes_without_commas(local_hub):
    train = data.load_problems("gsm8k", "train")
    raw = read_jsonl(FIXTURES / "gsm8k" / "main" / "train.jsonl")
    assert [p["problem"] for p in train] == [r["question"] for r in raw]
    assert [p["answer"] for p in train] == ["27", "1200", "-5"]  # "#### 1,200" -> 1200
    assert {p["source"] for p in train} == {"gsm8k"}
    assert all("subject" not in p and "level" not in p for p in train)
    assert [p["answer"] for p in data.load_problems("gsm8k", "test")] == ["105", "2590"]


def test_math_gold_is_the_last_boxed_answer_and_subject_level_are_kept(local_hub):
    test = data.load_problems("math", "test")
    # One test problem per subject config, in the order of data.MATH_SUBJECTS.
    assert [(p["subject"], p["level"], p["answer"]) for p in test] == [
        ("Algebra", 2, "4"),
        ("Counting & Probability", 2, "\\frac{1}{4}"),
        ("Geometry", "?", "9\\pi"),  # "Level ?" exists in some MATH copies
        ("Intermediate Algebra", 4, "[1,3)"),  # two boxes: the last one is the answer
        ("Number Theory", 1, "6"),
        ("Prealgebra", 1, "\\frac{3}{4}"),
        ("Precalculus", 2, "\\left( 2, \\frac{\\pi}{2} \\right)"),  # nested braces
    ]
    assert len(data.load_problems("math", "train")) == 8


def test_math500_reads_the_answer_field_and_has_only_a_test_split(local_hub):
    test = data.load_problems("math500", "test")
    raw = read_jsonl(FIXTURES / "math500" / "test.jsonl")
    assert [(p["problem"], p["answer"], p["subject"], p["level"]) for p in test] == [
        (r["problem"], r["answer"], r["subject"], r["level"]) for r in raw]
    with pytest.raises(ValueError, match="math500.*no split 'train'"):
        data.load_problems("math500", "train")


def test_sources_mix_in_the_order_given(local_hub):
    mixed = data.load_problems("math500, gsm8k", "test")
    assert [p["source"] for p in mixed] == ["math500"] * 6 + ["gsm8k"] * 2
    assert mixed == data.load_problems("math500", "test") + data.load_problems("gsm8k", "test")


def test_local_files_share_the_row_parser_with_the_hub_sources(local_hub, tmp_path):
    # Raw GSM8K and MATH files read locally give the same problems as the named sources.
    gsm8k_file = FIXTURES / "gsm8k" / "main" / "train.jsonl"
    local = data.load_problems(str(gsm8k_file), problem_field="question")
    hub = data.load_problems("gsm8k", "train")
    assert [(p["problem"], p["answer"]) for p in local] == [(p["problem"], p["answer"]) for p in hub]
    assert local[0]["source"] == str(gsm8k_file)

    math_file = FIXTURES / "hendrycks_math" / "intermediate_algebra" / "test.jsonl"
    local = data.load_problems(str(math_file), answer_field="solution")
    hub = [p for p in data.load_problems("math", "test") if p["subject"] == "Intermediate Algebra"]
    assert [{**p, "source": "math"} for p in local] == hub

    # .jsonl, .json and .parquet copies of the same rows load alike.
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = read_jsonl(FIXTURES / "math500" / "test.jsonl")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "p.parquet")
    expected = [{**p, "source": "x"} for p in data.load_problems("math500", "test")]
    for name in ("p.json", "p.parquet"):
        loaded = data.load_problems(str(tmp_path / name))
        assert [{**p, "source": "x"} for p in loaded] == expected, name


def test_plain_local_files(local_hub):
    jsonl = data.load_problems(str(FIXTURES / "local" / "problems.jsonl"))
    assert [(p["problem"], p["answer"]) for p in jsonl] == [
        ("What is 6 times 7?", "42"), ("What is 10 minus 4?", "6"), ("What is half of 9?", "\\frac{9}{2}")]
    as_json = data.load_problems(str(FIXTURES / "local" / "problems.json"))
    assert [(p["answer"], p.get("subject"), p.get("level")) for p in as_json] == [
        ("32", "Prealgebra", 2), ("12.5", None, None)]


def test_unknown_source_and_missing_file_are_named():
    with pytest.raises(ValueError, match="'mathh'.*not a named source"):
        data.load_problems("math500,mathh", "test")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_problems("nope.jsonl")


# -------------------------------------------------------------------------------------------------
# Bad rows
# -------------------------------------------------------------------------------------------------


def test_bad_row_error_names_file_and_row(tmp_path):
    path = FIXTURES / "bad" / "rows.jsonl"
    with pytest.raises(ValueError, match=r"bad/rows.jsonl row 1 \(line 2\): no gold answer \(field 'answer' is missing or null\)"):
        data.load_problems(str(path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('\n{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl row 1 \(line 3\): not an object with fields: '\{not json'"):
        data.load_problems(str(broken))
    as_json = tmp_path / "rows.json"
    as_json.write_text('[{"problem": "x", "answer": "1"}, {"problem": "y", "answer": null}]')
    with pytest.raises(ValueError, match=r"rows.json row 1: no gold answer"):
        data.load_problems(str(as_json))


def test_bad_rows_skipped_and_counted(caplog):
    # rows.jsonl: 2 good rows; missing answer, blank problem, invalid JSON, empty answer; a blank line (no row).
    with caplog.at_level(logging.WARNING, logger="data"):
        problems = data.load_problems(str(FIXTURES / "bad" / "rows.jsonl"), skip_bad_rows=True)
    assert [p["answer"] for p in problems] == ["2", "8"]
    assert problems.skipped == 4
    assert "skipped 4 bad rows" in caplog.text and "the first: " + str(FIXTURES / "bad" / "rows.jsonl") + " row 1" in caplog.text


def test_bad_hub_row_named_and_counted(local_hub):
    # A folder with the same name as the good one, loaded right after it: no stale rows from datasets' cache.
    assert len(data.load_problems("gsm8k", "train")) == 3
    local_hub("gsm8k", FIXTURES / "bad" / "gsm8k")
    with pytest.raises(ValueError, match=r"bad/gsm8k \(config main, split train\) row 1: no gold answer.*####"):
        data.load_problems("gsm8k", "train")
    problems = data.load_problems("gsm8k", "train", skip_bad_rows=True)
    assert [p["answer"] for p in problems] == ["10"] and problems.skipped == 1


def test_a_source_without_usable_rows_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match="no usable problems"):
        data.load_problems(str(path), skip_bad_rows=True)


# -------------------------------------------------------------------------------------------------
# Prompts
# -------------------------------------------------------------------------------------------------


def test_format_prompt_uses_the_chat_template_with_the_system_prompt(tiny_tokenizer):
    expected = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert data.format_prompt(tiny_tokenizer, "What is 2 + 3?") == expected


def test_format_prompt_with_the_real_qwen2_tokenizer(qwen2_tokenizer):
    text = data.format_prompt(qwen2_tokenizer, "What is 2 + 3?")
    assert text.startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT + "<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_template_without_a_chat_template(tiny_paths):
    import models

    tokenizer = models.load_tokenizer(str(tiny_paths["policy"]))
    tokenizer.chat_template = None
    text = data.format_prompt(tokenizer, "What is 2 + 3?")
    assert text == "Problem: What is 2 + 3?\n\n" + data.SYSTEM_PROMPT + "\n\nSolution:\n"


def test_tokenize_prompts_drops_long_prompts_and_counts_them(tiny_tokenizer):
    problems = [{"problem": "What is " + " + ".join(["1"] * n) + "?", "answer": str(n)} for n in (1, 8, 2, 30, 4)]
    lengths = [len(tiny_tokenizer.encode(data.format_prompt(tiny_tokenizer, p["problem"]), add_special_tokens=False))
               for p in problems]
    limit = sorted(lengths)[2]  # keeps exactly the three shortest
    kept, dropped = data.tokenize_prompts(tiny_tokenizer, problems, limit)
    assert dropped == 2
    assert [p["answer"] for p in kept] == [p["answer"] for p, n in zip(problems, lengths) if n <= limit]
    for p in kept:
        assert p["prompt"] == data.format_prompt(tiny_tokenizer, p["problem"])
        assert p["prompt_ids"] == tiny_tokenizer.encode(p["prompt"], add_special_tokens=False)
    assert "prompt_ids" not in problems[0]  # the input rows are not modified
    assert data.tokenize_prompts(tiny_tokenizer, problems)[1] == 0


# -------------------------------------------------------------------------------------------------
# Order
# -------------------------------------------------------------------------------------------------


def _ids(batch):
    return [p["answer"] for p in batch]


def test_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    problems = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    a, b = data.PromptSampler(problems, 2, seed=3), data.PromptSampler(problems, 2, seed=3)
    seq_a = [_ids(a.next_batch()) for _ in range(5)]
    assert seq_a == [_ids(b.next_batch()) for _ in range(5)]
    flat = [x for batch in seq_a for x in batch]  # 10 draws = exactly two epochs
    assert sorted(flat[:5]) == sorted(flat[5:]) == [str(i) for i in range(5)]
    assert flat[:5] != flat[5:]  # epochs reshuffle (for this seed)
    c = data.PromptSampler(problems, 2, seed=4)
    assert [_ids(c.next_batch()) for _ in range(5)] != seq_a


def test_sampler_resumes_the_exact_order_from_its_state_dict():
    problems = [{"problem": f"p{i}", "answer": str(i)} for i in range(7)]
    straight = data.PromptSampler(problems, 3, seed=0)
    expected = [_ids(straight.next_batch()) for _ in range(8)]

    first = data.PromptSampler(problems, 3, seed=0)
    head = [_ids(first.next_batch()) for _ in range(3)]  # stops mid-epoch (9 draws of 7)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = data.PromptSampler(problems, 3, seed=0)
    resumed.load_state_dict(state)
    assert head + [_ids(resumed.next_batch()) for _ in range(5)] == expected


def test_sampler_refuses_a_state_from_other_data():
    problems = [{"problem": f"p{i}", "answer": str(i)} for i in range(7)]
    state = data.PromptSampler(problems, 3, seed=0).state_dict()
    other = [{**p, "problem": p["problem"] + "!"} for p in problems]
    with pytest.raises(ValueError, match="fingerprint"):
        data.PromptSampler(other, 3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        data.PromptSampler(problems, 3, seed=1).load_state_dict(state)


def test_tiny_problems_are_deterministic_and_correct():
    problems = data.tiny_problems(16, seed=5)
    assert problems == data.tiny_problems(16, seed=5) and problems != data.tiny_problems(16, seed=6)
    for p in problems:
        a, op, b = p["problem"].removeprefix("What is ").removesuffix("?").split()
        assert int(p["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


# -------------------------------------------------------------------------------------------------
# MathInstruct: chain-of-thought rows with a readable final answer, once per question
# -------------------------------------------------------------------------------------------------


def test_mathinstruct_keeps_cot_rows_with_a_final_answer_and_counts_the_rest(local_hub, caplog):
    local_hub("mathinstruct", FIXTURES / "mathinstruct")
    raw = json.loads((FIXTURES / "mathinstruct" / "MathInstruct.json").read_text())
    with caplog.at_level(logging.INFO, logger="data"):
        train = data.load_problems("mathinstruct", "train")
    # rows 0, 1, 2, 8, 10 (by hand): a box, "The answer is 5", a choice letter resolved to its option's text,
    # "The answer is: 7.", and "The answer is $\frac{1}{2}$" with its dollar signs dropped.
    assert [p["problem"] for p in train] == [raw[i]["instruction"] for i in (0, 1, 2, 8, 10)]
    assert [p["answer"] for p in train] == ["\\frac{5}{6}", "5", "12 km", "7", "\\frac{1}{2}"]
    assert {p["source"] for p in train} == {"mathinstruct"}
    assert train.dropped == {"CoT/aqua_rat": {"unresolved choice": 1}, "PoT/mathqa": {"program of thought": 1},
                             "PoT/gsm_gpt4": {"program of thought": 1}, "CoT/gsm_rft": {"duplicate question": 1},
                             "CoT/number_comparison": {"no final answer": 1},
                             "CoT/college_math": {"no final answer": 1}}
    warned = sorted(r.getMessage().split()[2].rstrip(":") for r in caplog.records if r.levelno == logging.WARNING)
    assert warned == ["CoT/college_math", "PoT/gsm_gpt4", "PoT/mathqa"]  # each lost all of its (one) rows


@pytest.mark.parametrize("output,answer", [
    ("so 60 / 5 = 12.\nThe answer is (B).", "12 km"),   # a letter: its option's text
    ("The answer is B", "12 km"), ("The answer is Option C", "14 km"),
    ("The answer is: (B) 12", "12"), ("The answer is C) 14.", "14"),  # letter and value: the value
    ("The answer is E", "18"),  # the last option ends at the line's end, not in the next line
    ("The answer is 5.", "5"), ("The answer is A 5-digit number", "A 5-digit number"),  # not a choice letter
])
def test_mathinstruct_reads_final_answers_and_choice_letters(output, answer):
    question = "A car drives 60 km in 5 hours. How far in one?\nAnswer Choices: (A) 10 km (B) 12 km (C) 14 km (D) 16 (E) 18\nThink."
    row = {"source": "data/CoT/aqua_rat.json", "instruction": question, "output": output}
    assert data.MathInstructFilter().answer(row) == (answer, None)
    with pytest.raises(ValueError, match="no split 'test'"):
        data.load_problems("mathinstruct", "test")


def test_ppo_trains_on_mathinstruct_through_the_hub_loader(local_hub, tmp_path):
    import ppo

    local_hub("mathinstruct", FIXTURES / "mathinstruct")
    ppo.main(["--preset", "tiny", "--train-data", "mathinstruct", "--steps", "1", "--answer-workers", "1",
              "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run")])
    first = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    kept = {p["problem"] for p in data.load_problems("mathinstruct", "train")}
    assert first["problem"] in kept
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_data"] == "mathinstruct"


def test_the_paper_presets_train_on_mathinstruct():
    import ppo

    for flags in ([], ["--preset", "qwen2.5-math-1.5b"], ["--preset", "qwen2.5-math-7b"]):
        assert ppo.parse_config(flags).train_data == "mathinstruct"
