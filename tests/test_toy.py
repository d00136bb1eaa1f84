"""The CPU toy world: task generator, step verifier, character tokenizer, cached warm start, report."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import models
import data
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


def test_toy_hard_preset_builds_its_warm_start_and_trains(tmp_path, monkeypatch):
    """`--preset toy-hard` end to end at a micro size: the warm start is built for the hard world (4-6
    operations, HARD_CONFIG's slips), the prompts have 4-6 operations, and PPO runs its steps."""
    import ppo

    assert set(ppo.TOY_WORLDS) == set(toy.WORLDS)
    monkeypatch.setitem(toy.WORLDS, "toy-hard", dict(toy.HARD_CONFIG, **MICRO))
    out = tmp_path / "run"
    ppo.main(["--preset", "toy-hard", "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--prompts-per-step",
              "4", "--answer-workers", "1", "--log-samples-every", "1", "--output-dir", str(out)])
    config, rows = toy.read_run(out)
    assert config["max_new_tokens"] == 128 and [row["step"] for row in rows] == [1, 2]
    built = json.loads((Path(config["model"]) / "toy.json").read_text())
    assert (built["min_ops"], built["max_ops"], built["slip_fraction"], built["step_slip_fraction"]) == (4, 6, 0, 0.2)
    assert Path(config["model"]).parent == tmp_path / "cache" / "toy"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(4 <= sum(s["problem"].count(op) for op in "+-*") <= 6 for s in samples)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def write_run(folder, config, rows):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_table_uses_first_and_last_ten_steps(tmp_path):
    rows = [{"step": i, "reward/success": i / 20, "response/length": 20 + i, "response/steps": 4 + (i >= 15),
             "response/truncated": 0.5 * (i >= 18), "time/step": 3.0, "other": 1} for i in range(1, 21)]
    write_run(tmp_path / "prm_a1", {"reward": "prm", "alpha": 1.0}, rows)
    write_run(tmp_path / "success", {"reward": "success", "alpha": 1.0}, rows[:5])
    table = toy.report([tmp_path / "prm_a1", tmp_path / "success"], out=None)
    lines = table.splitlines()
    assert lines[0] == ("| run | reward | alpha | advantage | seeds | PPO steps | minutes | success "
                        "| steps per response | length (tokens) | truncated | mean success | steps to 0.5 | verdict |")
    # first ten steps 1..10: success mean 5.5/20 = 0.275, length 25.5, steps 4, truncated 0;
    # last ten steps 11..20: success 15.5/20 = 0.775, length 35.5, steps 4.6, truncated 0.15.
    # 20 steps of 3 s: 1.0 minute. A run without "advantage" in its config predates the flag: gae; without
    # "seed", seed 0. The 10-step mean success first reaches 0.5 at step 15 (steps 6..15: 105/200 = 0.525;
    # step 14: 0.475); its mean success over all steps is 210/400. Against `success` (end 0.15) prm ends higher
    # and its steps grow by 0.6 <= 1.0: it holds.
    assert lines[2] == ("| prm_a1 | prm | 1 | gae | 0 | 20 | 1.0 | 0.28 -> 0.78 | 4.0 -> 4.6 | 25.5 -> 35.5 "
                        "| 0.00 -> 0.15 | 0.525 | 15 | holds |")
    # a run shorter than ten steps: both windows cover all of it, and no full window reaches 0.5; alpha is not
    # shown for success only.
    assert lines[3] == ("| success | success | - | gae | 0 | 5 | 0.2 | 0.15 -> 0.15 | 4.0 -> 4.0 | 23.0 -> 23.0 "
                        "| 0.00 -> 0.00 | 0.150 | not reached | - |")

    out = tmp_path / "out" / "table.md"
    toy.main(["report", str(tmp_path / "prm_a1"), "--out", str(out), "--threshold", "0.75"])
    # without a `success` run there is nothing to judge against; 0.75 is first reached at step 20 (0.775)
    alone = lines[2].replace("| 15 | holds |", "| 20 | - |")
    assert out.read_text() == "\n".join([lines[0].replace("0.5", "0.75"), lines[1], alone]) + "\n"


def test_first_step_reaching_a_threshold_uses_full_trailing_windows():
    rows = [{"step": i, "reward/success": float(i > 10)} for i in range(1, 31)]
    assert toy.first_step_reaching(rows, 0.5) == 15   # the docstring's example: steps 6-15 hold five ones
    assert toy.first_step_reaching(rows, 1.0) == 20
    assert toy.first_step_reaching(rows, 0.0) == 10   # the first full window, not step 1
    assert toy.first_step_reaching(rows[:9], 0.0) is None
    assert toy.first_step_reaching(rows, 1.01) is None


def test_report_aggregates_seeds_mean_spread_and_steps_to_threshold(tmp_path):
    def run(name, reward, seed, success, advantage="gae", lr=3e-5):
        rows = [{"step": i, "reward/success": success(i), "response/length": 30 + seed, "response/steps": 5,
                 "response/truncated": 0.0, "time/step": 6.0} for i in range(1, 31)]
        write_run(tmp_path / name, {"reward": reward, "alpha": 1.0, "advantage": advantage, "seed": seed,
                                    "output_dir": f"runs/{name}", "policy_lr": lr}, rows)
        return tmp_path / name
    runs = [run("success-gae-s0", "success", 0, lambda i: 0.2),
            run("clip_delta-gae-s0", "clip_delta", 0, lambda i: 0.2 + 0.6 * (i > 10)),
            run("success-gae-s1", "success", 1, lambda i: 0.4),
            run("clip_delta-gae-s1", "clip_delta", 1, lambda i: 0.2 + 0.6 * (i > 20)),
            run("clip_delta-gae-s2", "clip_delta", 2, lambda i: 0.2 + 0.3 * (i > 5)),
            run("clip_delta-lr-s0", "clip_delta", 0, lambda i: 0.2, lr=1e-4)]  # another experiment: its own row
    lines = toy.report(runs, out=None).splitlines()[2:]
    assert len(lines) == 3
    # success: seeds 0 and 1 end at 0.2 and 0.4: mean 0.30, sample std 0.14; never reaches 0.5.
    assert lines[0] == ("| success-gae | success | - | gae | 0, 1 | 30 | 3.0 | 0.30 -> 0.30 +- 0.14 | 5.0 -> 5.0 "
                        "| 30.5 -> 30.5 | 0.00 -> 0.00 | 0.300 | 0 of 2 (not reached, not reached) | - |")
    # clip_delta: starts 0.2, 0.2, (5 x 0.2 + 5 x 0.5) / 10 = 0.35 -> mean 0.25; ends 0.8, 0.8, 0.5 -> mean 0.70,
    # sample std 0.17. Reaches 0.5 at step 15 (seed 0: 0.2*5 + 0.8*5 = 5.0) and 25 (seed 1); seed 2 plateaus at
    # 0.5 from step 15 (0.5 >= 0.5). Mean success over the 30 steps: 18/30, 12/30, 13.5/30 -> 0.483.
    # 0.70 - 0.30 above success: holds.
    assert lines[1] == ("| clip_delta-gae | clip_delta | 1 | gae | 0, 1, 2 | 30 | 3.0 | 0.25 -> 0.70 +- 0.17 "
                        "| 5.0 -> 5.0 | 31.0 -> 31.0 | 0.00 -> 0.00 | 0.483 | 18 (15, 25, 15) | holds |")
    # no success run at lr 1e-4 to judge against (gae's success ran at 3e-5)
    assert lines[2] == ("| clip_delta-lr-s0 | clip_delta | 1 | gae | 0 | 30 | 3.0 | 0.20 -> 0.20 | 5.0 -> 5.0 "
                        "| 30.0 -> 30.0 | 0.00 -> 0.00 | 0.200 | not reached | - |")

    # A rerun of a seed is shown beside the first run, not averaged with it.
    (tmp_path / "copy").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / "copy" / name).write_text((runs[0] / name).read_text())
    lines = toy.report([runs[0], tmp_path / "copy"], out=None).splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == ["| success-gae-s0", "| copy"]


def test_report_groups_toy_seeds_cuts_to_common_steps_and_plots_the_spread(tmp_path, capsys):
    """`--preset toy --seed N` warms up per seed (the folder names differ only there): still one experiment.
    A seed that stopped early cuts the others to its steps, with a note."""
    def run(name, seed, steps, success):
        rows = [{"step": i, "reward/success": success + 0.4 * (i > 12), "response/length": 30, "response/steps": 4,
                 "response/truncated": 0.0} for i in range(1, steps + 1)]
        write_run(tmp_path / name, {"reward": "clip", "alpha": 1.0, "seed": seed, "cache_dir": f"/c{seed}",
                                    "model": f"/c{seed}/toy/warm-seed{seed}-0123abcd"}, rows)
        return tmp_path / name
    runs = [run("clip-s0", 0, 30, 0.5), run("clip-s1", 1, 12, 0.7), run("other", 2, 30, 0.1)]
    (tmp_path / "other" / "config.json").write_text(json.dumps(
        {"reward": "clip", "alpha": 1.0, "seed": 2, "model": "/c/toy/warm-seed2-ffff0000"}))  # another world
    lines = toy.report(runs, out=tmp_path / "table.md").splitlines()[2:]
    assert [line.split(" | ")[:6] for line in lines] == [
        ["| clip", "clip", "1", "gae", "0, 1", "12"], ["| other", "clip", "1", "gae", "2", "30"]]
    assert lines[0].split(" | ")[7] == "0.60 -> 0.60 +- 0.14"  # steps 3-12 of seed 0 (0.5), not 21-30 (0.9)
    assert "clip: its seeds ran [12, 30] steps; all are cut to the first 12" in capsys.readouterr().err
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_verdict_compares_with_success_under_the_same_estimator(tmp_path):
    def run(name, reward, advantage, success, steps_end):
        rows = [{"step": i, "reward/success": success, "response/length": 30, "response/steps": 4 + steps_end * (i > 10),
                 "response/truncated": 0.0} for i in range(1, 21)]
        write_run(tmp_path / name, {"reward": reward, "alpha": 1.0, "advantage": advantage}, rows)
        return tmp_path / name
    runs = [run("s_gae", "success", "gae", 0.8, 0), run("s_grpo", "success", "grpo", 0.5, 0),
            run("prm_gae", "prm", "gae", 0.6, 3.0),     # 0.2 below gae's success and steps +3: fails twice
            run("clip_gae", "clip", "gae", 0.75, 0.5),  # 0.05 below, steps +0.5: holds
            run("prm_grpo", "prm", "grpo", 0.6, 0),     # above grpo's success (0.5), not gae's: holds
            run("delta_grpo", "delta", "grpo", 0.35, 1.5),  # 0.15 below, steps +1.5
            run("clip_rloo", "clip", "rloo", 0.1, 2.0)]     # no success run under rloo: steps only
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in toy.report(runs, out=None).splitlines()[2:]]
    assert verdicts == ["-", "-", "fails: success -0.20, steps +3.0", "holds", "holds",
                        "fails: success -0.15, steps +1.5", "fails: steps +2.0"]


def test_report_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(SystemExit, match="config.json not found"):
        toy.report([tmp_path], out=None)
    (tmp_path / "config.json").write_text(json.dumps({"reward": "prm"}))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="config.json has no 'alpha'"):
        toy.report([tmp_path], out=None)
    (tmp_path / "config.json").write_text(json.dumps({"reward": "prm", "alpha": 1}))
    row = {"step": 1, "reward/success": 0, "response/length": 1, "response/steps": 1, "response/truncated": 0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(SystemExit, match="metrics.jsonl line 2"):
        toy.report([tmp_path], out=None)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(SystemExit, match="line 1 lacks"):
        toy.report([tmp_path], out=None)


def test_report_plot_is_written_beside_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": i, "reward/success": 0.5, "response/length": 30, "response/steps": 4,
             "response/truncated": 0.0} for i in range(1, 4)]
    write_run(tmp_path / "clip", {"reward": "clip", "alpha": 1.0}, rows)
    write_run(tmp_path / "clip_grpo", {"reward": "clip", "alpha": 1.0, "advantage": "grpo"}, rows)
    toy.report([tmp_path / "clip", tmp_path / "clip_grpo"], out=tmp_path / "ablation.md")  # two rows of panels
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------------
# The CI-sized warm start (the session fixture `toy_ci_policy` in conftest.py) and a CI-sized PPO run
# -------------------------------------------------------------------------------------------------


def test_ci_warm_start_has_learned_the_format_and_some_arithmetic(toy_ci_policy):
    """The regime RL needs: well-formed solutions that finish, right often but not always when sampling."""
    held_out = toy.problems(100, seed=0, split="eval")
    greedy = toy.measure(toy_ci_policy, held_out, greedy=True)
    sampled = toy.measure(toy_ci_policy, held_out, greedy=False, seed=0)
    assert greedy["truncated"] == 0 and 3.0 <= greedy["steps"] <= 4.5
    assert greedy["success"] >= 0.5
    assert 0.1 <= sampled["success"] < greedy["success"]


def test_ci_sized_ppo_run_learns_and_is_deterministic(toy_ci_policy, tmp_path):
    """Through ppo.py's own path: the success reward alone raises the success rate of the CI warm start, and
    rerunning the first steps gives the same numbers (CPU, one thread)."""
    import ppo

    flags = ["--preset", "toy", "--model", str(toy_ci_policy), "--reward", "success", "--answer-workers", "1",
             "--policy-lr", "1e-4"]
    ppo.main(flags + ["--steps", "30", "--output-dir", str(tmp_path / "long")])
    ppo.main(flags + ["--steps", "3", "--output-dir", str(tmp_path / "short")])
    long, short = (toy.read_run(tmp_path / name)[1] for name in ("long", "short"))
    success = [m["reward/success"] for m in long]
    start, end = sum(success[:8]) / 8, sum(success[-8:]) / 8
    assert end > start + 0.05, success
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
        steps = [row["response/steps"] for row in toy.read_run(out)[1]]
        growth[reward] = sum(steps[-5:]) / 5 - sum(steps[:5]) / 5
    assert growth["prm"] >= 1.0, growth
    assert growth["clip_delta"] <= 0.3, growth
