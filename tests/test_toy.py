"""The CPU toy world: task generator, step verifier, character tokenizer, cached warm start, presets."""

import ast
import json
import random
from pathlib import Path

import pytest
import torch

import data
import models
import report
import toy

# -------------------------------------------------------------------------------------------------
# Step verifier
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step, score", [
    ("3+4=7", 0.9),            # right
    ("12*3=36", 0.9),
    ("14-5=9", 0.9),
    (" 14 - 5 = 9 ", 0.9),     # spaces do not matter
    ("5-7=-2", 0.9),           # right, even if the task never goes below 0
    ("7+0=7", 0.9),            # right but useless: a local judge scores it high (what PRM hacking exploits)
    ("7*1=7", 0.9),
    ("3+4=8", 0.1),            # wrong
    ("7*2=15", 0.1),
    ("3+4", 0.1),              # malformed
    ("3+=7", 0.1),
    ("=7", 0.1),
    ("3+4=7=7", 0.1),
    ("3+4=7\n7+1=8", 0.1),     # two equations in one step
    ("(3+4)=7", 0.1),
    ("boxed{7}", 0.1),
    ("\\boxed{7", 0.1),
    ("\\boxed{9}", 0.5),       # the final step, whatever its value
    ("\\boxed{123}", 0.5),
])
def test_step_verifier_scores_hand_written_steps(step, score):
    assert toy.step_verifier(["(3+4)*2"], [[step]]) == [[score]]


def test_step_verifier_keeps_the_shape_of_ragged_batches():
    scores = toy.step_verifier(
        ["(3+4)*2", "(1+1)-1", "2*3"],
        [["3+4=7", "7+0=7", "7*2=15", "\\boxed{15}"], [], ["2*3=6", "\\boxed{6}"]],
    )
    assert scores == [[0.9, 0.9, 0.1, 0.5], [], [0.9, 0.5]]
    with pytest.raises(ValueError, match="2 questions but 1"):
        toy.step_verifier(["a", "b"], [["3+4=7"]])


# -------------------------------------------------------------------------------------------------
# Task generator
# -------------------------------------------------------------------------------------------------


def steps_of(solution: str) -> list[str]:
    return solution.split("\n\n")


def test_answers_equal_python_eval_of_the_parenthesised_prompt():
    items = toy.problems(500, seed=3)
    for item in items:
        assert set(item) == {"problem", "answer"}
        assert item["answer"] == str(eval(item["problem"]))
    # Graded difficulty: both 2- and 3-operation problems, nothing else.
    counts = {sum(item["problem"].count(op) for op in "+-*") for item in items}
    assert counts == {2, 3}


def test_clean_solutions_step_through_the_prompt_within_range():
    rng = random.Random(0)
    for _ in range(300):
        start, ops = toy.sample_chain(rng, rng.randint(2, 3))
        prompt = toy.expression(start, ops)
        steps = steps_of(toy.write_solution(start, ops))
        assert len(steps) == len(ops) + 1
        value = start
        for step, (op, b) in zip(steps, ops):
            lhs, rhs = step.split("=")
            assert lhs == f"{value}{op}{b}" and 1 <= b <= 9
            value = eval(lhs)
            assert rhs == str(value) and 0 <= value <= 99
        assert steps[-1] == f"\\boxed{{{eval(prompt)}}}"


def test_expression_is_fully_parenthesised():
    assert toy.expression(3, [("+", 4), ("*", 2), ("-", 5)]) == "((3+4)*2)-5"
    assert toy.expression(3, [("+", 4), ("*", 2)]) == "(3+4)*2"
    assert toy.write_solution(3, [("+", 4), ("*", 2), ("-", 5)]) == "3+4=7\n\n7*2=14\n\n14-5=9\n\n\\boxed{9}"


def test_problems_are_seeded_prefix_stable_and_splits_differ():
    assert toy.problems(20, seed=1) == toy.problems(20, seed=1)
    assert toy.problems(20, seed=1) == toy.problems(30, seed=1)[:20]
    assert toy.problems(20, seed=1) != toy.problems(20, seed=2)
    assert toy.problems(20, seed=1) != toy.problems(20, seed=1, split="eval")
    with pytest.raises(ValueError, match="min_ops"):
        toy.problems(1, min_ops=3, max_ops=2)


def test_slips_are_carried_forward_and_make_the_answer_wrong():
    rng = random.Random(1)
    for _ in range(200):
        start, ops = toy.sample_chain(rng, 3)
        steps = steps_of(toy.write_solution(start, ops, rng, slip_fraction=1.0))
        wrong = 0
        previous = str(start)
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert lhs.startswith(previous)  # each step starts from the value written before it
            off = int(rhs) - eval(lhs)
            assert off in (0, -2, -1, 1, 2)
            wrong += off != 0
            previous = rhs
        assert wrong == 1
        assert steps[-1] == f"\\boxed{{{previous}}}"
        assert previous != str(toy.evaluate_chain(start, ops))


def test_step_slips_are_independent_per_step_and_carried_forward():
    rng = random.Random(3)
    n, wrong_steps, clean = 4000, 0, 0
    for _ in range(n):
        start, ops = toy.sample_chain(rng, 5)
        steps = steps_of(toy.write_solution(start, ops, rng, step_slip_fraction=0.2))
        value, slips = str(start), 0
        for step, (op, b) in zip(steps, ops):
            lhs, rhs = step.split("=")
            assert lhs == f"{value}{op}{b}"  # each step computes from the value written before it
            slips += int(rhs) != eval(lhs)
            value = rhs
        right = steps[-1] == f"\\boxed{{{toy.evaluate_chain(start, ops)}}}"
        assert right or slips > 0
        if slips == 1:
            assert not right  # a single slip is carried to the answer (two can cancel: +1, later -1)
        wrong_steps += slips
        clean += slips == 0
    assert abs(wrong_steps / (5 * n) - 0.2) < 0.01
    assert abs(clean / n - 0.8 ** 5) < 0.02  # independent per step: 0.33 of 5-step solutions have no slip


def test_noise_fractions_match_the_configuration():
    rng = random.Random(2)
    n, slipped, redundant = 4000, 0, 0
    for _ in range(n):
        start, ops = toy.sample_chain(rng, 3)
        solution = toy.write_solution(start, ops, rng, slip_fraction=0.35)
        slipped += steps_of(solution)[-1] != f"\\boxed{{{toy.evaluate_chain(start, ops)}}}"
    for _ in range(n):
        start, ops = toy.sample_chain(rng, 3)
        steps = steps_of(toy.write_solution(start, ops, rng, redundant_fraction=0.1))
        # Walk the chain: a step that is not the next operation must be a redundant `v+0=v`, `v-0=v`, `v*1=v`.
        value, pending = str(start), list(ops)
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            if pending and lhs == f"{value}{pending[0][0]}{pending[0][1]}":
                pending.pop(0)
            else:
                assert lhs in (f"{value}+0", f"{value}-0", f"{value}*1") and rhs == value
                redundant += 1
            value = rhs
        assert pending == [] and steps[-1] == f"\\boxed{{{value}}}"
    assert abs(slipped / n - 0.35) < 0.03
    assert abs(redundant / (3 * n) - 0.1) < 0.01  # at most one after each of the 3n real steps


# -------------------------------------------------------------------------------------------------
# Character tokenizer
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """The toy tokenizer after a save / load round trip through models.load_tokenizer, saved beside a qwen2
    config as in a warm-start folder (transformers then loads it as Qwen2Tokenizer, rebuilding its pipeline)."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("toy_tokenizer")
    tokenizer = toy.build_tokenizer()
    tokenizer.save_pretrained(folder)
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(folder)
    return models.load_tokenizer(str(folder))


def test_tokenizer_round_trip_is_exact_one_token_per_character(char_tokenizer):
    rng = random.Random(0)
    texts = ["3+4=7\n\n7*2=14\n\n\\boxed{14}", "((3+4)*2)-5\n\n", "\n", ""]
    texts += ["".join(rng.choice(toy.SYMBOLS) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in texts:
        ids = char_tokenizer.encode(text)
        assert len(ids) == len(text)
        assert char_tokenizer.decode(ids) == text
    ids = char_tokenizer.encode("\\boxed{9}<|im_end|>")
    assert ids[-1] == char_tokenizer.eos_token_id and len(ids) == len("\\boxed{9}") + 1
    assert char_tokenizer.decode(ids, skip_special_tokens=True) == "\\boxed{9}"


def test_tokenizer_specials_padding_and_vocabulary(char_tokenizer):
    assert char_tokenizer.padding_side == "left"
    assert char_tokenizer.eos_token == "<|im_end|>" and char_tokenizer.pad_token == "<|endoftext|>"
    assert char_tokenizer.eos_token_id != char_tokenizer.pad_token_id
    assert len(char_tokenizer) == len(set(toy.SYMBOLS)) + 2
    batch = char_tokenizer(["1+2", "13*4"], padding=True)
    pad = char_tokenizer.pad_token_id
    assert batch["input_ids"][0][0] == pad and batch["attention_mask"] == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert char_tokenizer.decode(char_tokenizer.encode("3 + 4 ?")) == "3+4"  # characters outside SYMBOLS are dropped


def test_chat_template_renders_only_the_last_user_message(char_tokenizer):
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "(1+2)*3"},
        {"role": "assistant", "content": "1+2=3"},
        {"role": "user", "content": "((3+4)*2)-5"},
    ]
    prompt = char_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "((3+4)*2)-5\n\n"
    assert char_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False) == "((3+4)*2)-5"
    assert data.format_prompt(char_tokenizer, "(3+4)*2") == "(3+4)*2\n\n"


# -------------------------------------------------------------------------------------------------
# Warm start
# -------------------------------------------------------------------------------------------------

MICRO = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, sft_steps=4, batch_size=4)


def test_warm_start_is_deterministic_and_loads_like_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    first = toy.warm_start(tmp_path / "a", seed=5, **MICRO)
    second = toy.warm_start(tmp_path / "b", seed=5, **MICRO)
    other_seed = toy.warm_start(tmp_path / "b", seed=6, **MICRO)
    assert first.name == second.name and other_seed != second
    weights = [load_file(str(p / "model.safetensors")) for p in (first, second, other_seed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])

    tokenizer = models.load_tokenizer(str(first))
    model = models.load_model(str(first))
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    assert models.stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    assert tokenizer.decode(tokenizer.encode("(3+4)*2\n\n")) == "(3+4)*2\n\n"
    assert data.format_prompt(tokenizer, "(3+4)*2") == "(3+4)*2\n\n"  # the chat template travels with it
    assert json.loads((first / "toy.json").read_text())["seed"] == 5


def test_warm_start_cache_is_reused_and_keyed_by_configuration(tmp_path, monkeypatch):
    folder = toy.warm_start(tmp_path, seed=0, **MICRO)
    built = []

    def fake_build(out, seed, config):
        built.append(config)
        (out / "toy.json").write_text("{}")

    monkeypatch.setattr(toy, "_build_warm_start", fake_build)
    assert toy.warm_start(tmp_path, seed=0, **MICRO) == folder
    assert built == []
    other = toy.warm_start(tmp_path, seed=0, **dict(MICRO, sft_steps=5))
    assert other != folder and [config["sft_steps"] for config in built] == [5]
    assert sorted(tmp_path.iterdir()) == sorted([folder, other])  # no temporary folder left behind
    with pytest.raises(ValueError, match=r"unknown configuration fields \['hidden'\]"):
        toy.warm_start(tmp_path, hidden=3)


def test_warm_start_that_loses_a_race_keeps_the_winner(tmp_path, monkeypatch):
    real_build = toy._build_warm_start

    def build_while_another_run_finishes_first(out, seed, config):
        monkeypatch.setattr(toy, "_build_warm_start", real_build)
        winner = toy.warm_start(tmp_path, seed, **MICRO)  # the other run, done while this one builds
        (winner / "winner").write_text("")
        real_build(out, seed, config)

    monkeypatch.setattr(toy, "_build_warm_start", build_while_another_run_finishes_first)
    folder = toy.warm_start(tmp_path, seed=0, **MICRO)
    assert (folder / "winner").is_file()
    assert list(tmp_path.iterdir()) == [folder]  # this run's temporary copy is gone


def test_warm_start_draws_its_operations_from_the_configuration(tmp_path, monkeypatch):
    """The SFT data of a world has its number of operations, and the world is part of the cache key."""
    drawn = []
    real_sample_chain = toy.sample_chain
    monkeypatch.setattr(toy, "sample_chain", lambda rng, n: drawn.append(n) or real_sample_chain(rng, n))
    hard = toy.warm_start(tmp_path, seed=0, **dict(toy.HARD_CONFIG, **MICRO))
    assert set(drawn) == {4, 5, 6}  # 4 steps x 4 rows
    drawn.clear()
    assert toy.warm_start(tmp_path, seed=0, **MICRO) != hard and set(drawn) == {2, 3}


def test_toy_imports_no_ppo():
    """Imports go one way: ppo.py (and report.py on top of it) import toy.py, never the reverse, not even inside
    a function."""
    tree = ast.parse(Path(toy.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {"ppo", "report"}.isdisjoint(imported)


def test_toy_hard_preset_builds_its_warm_start_and_trains(tmp_path, monkeypatch):
    """`--preset toy-hard` end to end at a micro size: the warm start is built for the hard world (4-6
    operations, HARD_CONFIG's slips), the prompts have 4-6 operations, and PPO runs its steps."""
    import ppo

    assert set(toy.PRESETS) == set(toy.WORLDS)
    monkeypatch.setitem(toy.WORLDS, "toy-hard", dict(toy.HARD_CONFIG, **MICRO))
    out = tmp_path / "run"
    ppo.main(["--preset", "toy-hard", "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--prompts-per-step",
              "4", "--answer-workers", "1", "--log-samples-every", "1", "--output-dir", str(out)])
    config, rows = report.read_run(out)
    assert config["max_new_tokens"] == 128 and [row["step"] for row in rows] == [1, 2]
    built = json.loads((Path(config["model"]) / "toy.json").read_text())
    assert (built["min_ops"], built["max_ops"], built["slip_fraction"], built["step_slip_fraction"]) == (4, 6, 0, 0.2)
    assert Path(config["model"]).parent == tmp_path / "cache" / "toy"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(4 <= sum(s["problem"].count(op) for op in "+-*") <= 6 for s in samples)


# -------------------------------------------------------------------------------------------------
# The CI-sized warm start (the session fixture `toy_ci_policy` in conftest.py) and a CI-sized PPO run
# -------------------------------------------------------------------------------------------------


def test_ci_warm_start_has_learned_the_format_and_some_arithmetic(toy_ci_policy):
    """The regime RL needs: well-formed solutions that finish, right often but not always when sampling."""
    held_out = toy.problems(100, seed=0, split="eval")
    greedy = toy.measure_policy(toy_ci_policy, held_out, temperature=0.0)
    sampled = toy.measure_policy(toy_ci_policy, held_out, temperature=1.0, seed=0)
    assert greedy["truncated"] == 0 and 3.0 <= greedy["steps"] <= 4.5
    assert greedy["success"] >= 0.5
    assert 0.1 <= sampled["success"] < greedy["success"]


def test_ci_sized_ppo_run_is_deterministic(toy_ci_policy, tmp_path):
    """Through ppo.py's own path: rerunning the first steps gives the same numbers (CPU, one thread).

    It also asserted that 30 steps of the success reward raise the CI warm start's success rate by 0.05. That
    held on the CPU that wrote it and not on an AVX-512/AMX Xeon (0.31 -> 0.29 at lr 1e-4, flat at 3e-4, a
    collapse at 1e-3): the warm start and the sampling round differently per CPU, and 30 steps of 64 samples
    are within the noise. Learning is checked where it is not noise: the full toy runs (README) and the
    CI-sized headline test below (padding under raw PRM shaping)."""
    import ppo

    flags = ["--preset", "toy", "--model", str(toy_ci_policy), "--reward", "success", "--answer-workers", "1",
             "--policy-lr", "1e-4"]
    ppo.main(flags + ["--steps", "5", "--output-dir", str(tmp_path / "long")])
    ppo.main(flags + ["--steps", "3", "--output-dir", str(tmp_path / "short")])
    long, short = (report.read_run(tmp_path / name)[1] for name in ("long", "short"))
    assert len(long) == 5
    for a, b in zip(long[:3], short):
        for key in a:
            if not key.startswith(("time/", "throughput/")):
                assert a[key] == b[key], (a["step"], key)


def test_ci_sized_headline_prm_is_farmed_and_clip_delta_is_not(toy_ci_policy, tmp_path):
    """The paper's claim at CI size, through ppo.py under gae: with raw PRM scores as step rewards the policy
    pads its solutions with steps (steps per response, last 5 PPO steps vs first 5, grow by >= 1.0; 4.3 -> 8.1
    here), with Clip-Delta they do not (<= 0.3; 3.8 -> 3.6). Deterministic on one thread."""
    import ppo

    growth = {}
    for reward in ("prm", "clip_delta"):
        out = tmp_path / reward
        ppo.main(["--preset", "toy", "--model", str(toy_ci_policy), "--reward", reward, "--answer-workers", "1",
                  "--policy-lr", "1e-4", "--steps", "20", "--log-samples-every", "0", "--output-dir", str(out)])
        steps = [row["response/steps"] for row in report.read_run(out)[1]]
        growth[reward] = sum(steps[-5:]) / 5 - sum(steps[:5]) / 5
    assert growth["prm"] >= 1.0, growth
    assert growth["clip_delta"] <= 0.3, growth
