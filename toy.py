"""The CPU toy world: PRM reward hacking and its Clip/Delta fix, reproduced on a laptop in minutes.

A synthetic multi-step arithmetic task stands in for MATH, a step verifier stands in for the PRM, and a small
character-level Qwen2 stands in for the policy. Everything is built locally, so `python ppo.py --preset toy`
runs through exactly the code path of the real runs with no downloads.

- Task: a start digit and 2-3 operations (`+ - *`, operands 1-9, every intermediate value in 0..99), written
  fully parenthesised so that Python's precedence agrees with the order of the steps. The solution is one
  step per paragraph:

      prompt   ((3+4)*2)-5
      solution 3+4=7

               7*2=14

               14-5=9

               \\boxed{9}

- PRM: `step_verifier` scores each step on its own: 0.9 when `a op b = c` is right, 0.1 when wrong or
  unparseable, 0.5 for the `\\boxed{}` step. It judges steps locally, so a correct but useless step (`7+0=7`)
  also scores 0.9: every extra step adds reward, which is what raw PRM shaping lets the policy exploit.
- Tokenizer: one token per character (25 symbols plus pad and eos), a `PreTrainedTokenizerFast`.
- Policy: a small Qwen2, warm-started by a short supervised fine-tune on generated solutions of which 35%
  carry one arithmetic slip (carried forward) and 10% of steps are followed by a redundant correct step, so
  that it samples right answers about 60% of the time (greedy: nearly always) and RL has room both to
  improve and to pad.
  `warm_start` caches the result in a folder keyed by seed and configuration.
- The harder world (`--preset toy-hard`, HARD_CONFIG): the same task with 4-6 operations, and a warm start
  whose SFT solutions slip at each step with probability 0.2, so that sampled success starts near 0.27: where
  the success reward is rare, to see whether dense step credit speeds learning.
- PRESETS: the ppo.py presets of the two worlds (`--preset toy`, `--preset toy-hard`), which ppo.py takes in.
- `python toy.py warm-start [--world toy-hard] [--ci]` builds the cache ahead of time and measures the warm start
  on 200 held-out problems (eval.evaluate, greedy and sampled). The table and plot of runs, and the timing of
  one toy rollout's scoring and update, are in report.py (a script on top of ppo.py; toy.py imports no ppo).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import eval as evaluation
import models
import rewards

# -------------------------------------------------------------------------------------------------
# Task generator
# -------------------------------------------------------------------------------------------------

OPS = "+-*"
MAX_VALUE = 99  # every intermediate value of a problem stays in 0..MAX_VALUE


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operation {op!r}")


def sample_chain(rng: random.Random, num_ops: int) -> tuple[int, list[tuple[str, int]]]:
    """A start digit 1-9 and `num_ops` (operation, operand 1-9) pairs whose running values stay in 0..99.

    The operation is drawn uniformly among those that some operand keeps in range (`*` always qualifies,
    by 1), then the operand uniformly among those that keep the value in range.
    """
    value = rng.randint(1, 9)
    start, ops = value, []
    for _ in range(num_ops):
        choices = {op: [b for b in range(1, 10) if 0 <= apply_op(value, op, b) <= MAX_VALUE] for op in OPS}
        op = rng.choice([op for op in OPS if choices[op]])
        b = rng.choice(choices[op])
        ops.append((op, b))
        value = apply_op(value, op, b)
    return start, ops


def expression(start: int, ops: list[tuple[str, int]]) -> str:
    """Fully parenthesised prompt: (3, [('+', 4), ('*', 2), ('-', 5)]) -> '((3+4)*2)-5'."""
    text = str(start)
    for i, (op, b) in enumerate(ops):
        text = f"{text}{op}{b}" if i == len(ops) - 1 else f"({text}{op}{b})"
    return text


def evaluate_chain(start: int, ops: list[tuple[str, int]]) -> int:
    value = start
    for op, b in ops:
        value = apply_op(value, op, b)
    return value


def problems(n: int, seed: int = 0, split: str = "train", min_ops: int = 2, max_ops: int = 3) -> list[dict]:
    """`n` problems as {"problem": "((3+4)*2)-5", "answer": "9"}, the dict shape data.py yields for datasets.

    Difficulty is graded by the number of operations, drawn uniformly in [min_ops, max_ops]. `split` names an
    independent random stream ("train", "eval", ...), so a held-out set never shares the training stream;
    `problems(n, seed, split)` is a prefix of `problems(n + 1, seed, split)`.
    """
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={min_ops}, max_ops={max_ops}")
    rng = random.Random(f"toy-{split}-{seed}")
    out = []
    for _ in range(n):
        start, ops = sample_chain(rng, rng.randint(min_ops, max_ops))
        out.append({"problem": expression(start, ops), "answer": str(evaluate_chain(start, ops))})
    return out


REDUNDANT_STEPS = ("{v}+0={v}", "{v}-0={v}", "{v}*1={v}")


def write_solution(
    start: int,
    ops: list[tuple[str, int]],
    rng: random.Random | None = None,
    slip_fraction: float = 0.0,
    redundant_fraction: float = 0.0,
    step_slip_fraction: float = 0.0,
) -> str:
    """The step-by-step solution text, steps separated by a blank line, ending with `\\boxed{answer}`.

    With an `rng`, a fraction `slip_fraction` of solutions gets one arithmetic slip: the result of one step,
    chosen uniformly, is off by 1 or 2 (never below 0) and the later steps compute from the wrong value, so
    the boxed answer is wrong too. Besides, each step slips on its own with probability `step_slip_fraction`
    (a solution of n steps is then right with probability (1 - step_slip_fraction)^n, so longer chains fail
    more often). Independently, each step is followed with probability `redundant_fraction` by a correct but
    useless step such as `7+0=7`.
    Example: write_solution(3, [('+', 4), ('*', 2)]) == '3+4=7\\n\\n7*2=14\\n\\n\\\\boxed{14}'.
    """
    slip_at = -1
    if rng is not None and rng.random() < slip_fraction:
        slip_at = rng.randrange(len(ops))
    steps, value = [], start
    for i, (op, b) in enumerate(ops):
        result = apply_op(value, op, b)
        if i == slip_at or (rng is not None and step_slip_fraction and rng.random() < step_slip_fraction):
            delta = rng.choice([-2, -1, 1, 2])
            result = result + delta if result + delta >= 0 else result - delta
        steps.append(f"{value}{op}{b}={result}")
        value = result
        if rng is not None and rng.random() < redundant_fraction:
            steps.append(rng.choice(REDUNDANT_STEPS).format(v=value))
    steps.append(f"\\boxed{{{value}}}")
    return "\n\n".join(steps)


# -------------------------------------------------------------------------------------------------
# Step verifier: the toy PRM
# -------------------------------------------------------------------------------------------------

RIGHT_STEP, WRONG_STEP, BOXED_STEP = 0.9, 0.1, 0.5
_EQUATION = re.compile(r"(\d+)([+\-*])(\d+)=(-?\d+)")
_BOXED = re.compile(r"\\boxed\{-?\d+\}")


def score_step(step: str) -> float:
    """0.9 for a right `a op b = c` (spaces allowed), 0.5 for `\\boxed{n}`, 0.1 for anything else."""
    text = "".join(step.split())
    if _BOXED.fullmatch(text):
        return BOXED_STEP
    match = _EQUATION.fullmatch(text)
    if match is None:
        return WRONG_STEP
    a, op, b, c = match.groups()
    return RIGHT_STEP if apply_op(int(a), op, int(b)) == int(c) else WRONG_STEP


def step_verifier(questions: list[str], steps: list[list[str]]) -> list[list[float]]:
    """The toy PRM, with the PRM interface: one score in [0, 1] per step of each response.

    questions: [B] problem texts (unused: every step is judged on its own, as learned PRMs largely do).
    steps: [B][K_b] step texts of each response (already split on the delimiter, empty steps dropped).
    Example: step_verifier(["(3+4)*2"], [["3+4=7", "7+0=7", "7*2=15", "\\\\boxed{15}"]])
             == [[0.9, 0.9, 0.1, 0.5]]
    """
    if len(questions) != len(steps):
        raise ValueError(f"step_verifier: {len(questions)} questions but {len(steps)} step lists")
    return [[score_step(step) for step in response] for response in steps]


def prefix_correct(questions: list[str], steps: list[list[str]]) -> list[list[float]]:
    """The truth a learned PRM is measured against (prm.py evaluate --truth toy:prefix_correct), with the PRM
    interface: 1.0 while the solution is still on track after step k, else 0.0. On track: every step so far
    applies the problem's next operation to the true running value and writes the true result, or is an identity
    step on that value (`7+0=7`), and a `\\boxed{}` step boxes the answer after all operations. Once off, off.

        prefix_correct(["(3+4)*2"], [["3+4=7", "7+0=7", "7*2=15", "\\\\boxed{15}"]]) == [[1.0, 1.0, 0.0, 0.0]]
    """
    out = []
    for question, response in zip(questions, steps, strict=True):
        numbers = re.findall(r"[+\-*]?\d+", question.replace("(", "").replace(")", ""))
        value, ops = int(numbers[0]), [(n[0], int(n[1:])) for n in numbers[1:]]
        done, on_track, verdicts = 0, True, []
        for step in response:
            text = "".join(step.split())
            match = _EQUATION.fullmatch(text)
            if _BOXED.fullmatch(text):
                on_track = on_track and done == len(ops) and text == f"\\boxed{{{value}}}"
            elif match is None or int(match[1]) != value:
                on_track = False
            elif done < len(ops) and (match[2], int(match[3])) == ops[done] and int(match[4]) == apply_op(
                    value, *ops[done]):
                done, value = done + 1, int(match[4])
            else:  # only an identity step on the running value keeps it on track
                on_track = on_track and (match[2], match[3]) in (("+", "0"), ("-", "0"), ("*", "1")) and int(
                    match[4]) == value
            verdicts.append(float(on_track))
        out.append(verdicts)
    return out


# -------------------------------------------------------------------------------------------------
# Character-level tokenizer
# -------------------------------------------------------------------------------------------------

PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"  # Qwen's names (see build_tokenizer)
SYMBOLS = "0123456789+-*()=\\boxed{}\n"  # every character a prompt or a solution uses
PROMPT_SEPARATOR = "\n\n"  # between the problem and the solution, like the step delimiter

# Renders only the last user message (a system prompt's characters are not in the vocabulary), then the
# separator after which the policy writes its first step.
CHAT_TEMPLATE = (
    "{%- set last = namespace(content='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set last.content = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ last.content }}"
    "{%- if add_generation_prompt -%}{{ '" + PROMPT_SEPARATOR.replace("\n", "\\n") + "' }}{%- endif -%}"
)


def build_tokenizer():
    """One token per character of SYMBOLS, plus `<|endoftext|>` (pad, id 0) and `<|im_end|>` (eos, id 1).

    Why it is a byte-level BPE without merges rather than a plain character table: transformers 5 loads any
    tokenizer saved beside a `qwen2` config as `Qwen2Tokenizer`, which rebuilds the pipeline (NFC, Qwen2's
    pre-tokenizer split, byte-level mapping, BPE) from the saved vocabulary and merges whatever
    tokenizer.json says. A character table would silently lose every newline (`\n` is `Ċ` at byte level).
    This tokenizer *is* that pipeline, with no merges, so it encodes the same wherever it is loaded. Its
    vocabulary holds the byte-level forms of SYMBOLS (`\n` -> `Ċ`, the others are themselves).

    decode(encode(x)) == x for any text over SYMBOLS. Characters outside SYMBOLS are dropped by `encode`
    (BPE without an unknown token), so a toy prompt must hold only the problem itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    byte_form = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = ["".join(piece for piece, _ in byte_form.pre_tokenize_str(c)) for c in dict.fromkeys(SYMBOLS)]
    vocab = {token: i for i, token in enumerate([PAD_TOKEN, EOS_TOKEN, *symbols])}
    chars = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    chars.normalizer = normalizers.NFC()
    chars.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(models.QWEN2_SPLIT_PATTERN), behavior="isolated"), byte_form,
    ])
    chars.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=chars,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,  # Qwen2Tokenizer would otherwise add its default unk as a new, 29th token
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------------------
# Supervised warm start, cached by seed and configuration
# -------------------------------------------------------------------------------------------------

# The toy world's first plan was 1,500 SFT steps at lr 2e-3; 800 steps at lr 3e-3 give the same
# warm start (greedy success 0.99 vs 1.00, sampled 0.58 vs 0.61 on 200 held-out problems) in half the time
# (about 5 min on one thread). Every field is part of the cache key.
FULL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_layers=4,
    num_heads=4,
    sft_steps=800,
    batch_size=64,
    lr=3e-3,
    slip_fraction=0.35,
    redundant_fraction=0.10,
    step_slip_fraction=0.0,
    min_ops=2,  # operations per problem, drawn uniformly in [min_ops, max_ops], for the SFT data and for PPO
    max_ops=3,
)
# A smaller warm start for tests and CI, built once per test session (about 40 s on one thread; greedy success
# about 0.8, sampled about 0.3 on held-out problems). Half the width and depth learns the arithmetic only with a
# higher learning rate.
CI_SIZE = dict(hidden_size=64, intermediate_size=256, num_layers=2, sft_steps=1000, batch_size=32, lr=5e-3)
# The harder world (preset toy-hard): chains of 4-6 operations, and SFT solutions in which each step slips with
# probability 0.2 (right 0.8^n of the time), so that the warm start is right 0.27 of the time when sampling and
# 0.96 greedy on 200 held-out problems: it knows the arithmetic, but success is rare. One slip in 60% or 70% of
# the solutions instead (the toy's kind of noise) gave 0.445 and 0.465 sampled: the model learns a per-step slip
# rate and applies it to every step, so success only falls as exp(-fraction). 0.25 per step gave 0.19.
HARD_CONFIG = dict(FULL_CONFIG, min_ops=4, max_ops=6, slip_fraction=0.0, step_slip_fraction=0.2)
# The worlds by the name their preset, model and data source use (PRESETS; ppo.py reads both).
WORLDS = {"toy": FULL_CONFIG, "toy-hard": HARD_CONFIG}
# The ppo.py presets of the two worlds (ppo.PRESETS takes them in), by the same names as WORLDS.
PRESETS: dict[str, dict] = {
    # The CPU toy world: a step verifier as PRM, a warm-started character-level policy.
    "toy": dict(model="toy", prm="toy:step_verifier", train_data="toy", eval_data="toy", prompts_per_step=16,
                samples_per_prompt=4, max_new_tokens=64, temperature=1.0, ppo_epochs=2, ppo_minibatches=2,
                policy_lr=3e-5, critic_lr=1e-4, warmup_steps=0, beta=0.02, alpha=1.0, eta=0.5, steps=120,
                micro_batch_tokens=4096, gradient_checkpointing=False, log_samples_every=10, output_dir="runs/toy",
                max_prompt_tokens=64),
}
# The harder toy world: 4-6 operations per problem and a warm start that succeeds about 0.3 of the time when
# sampling (HARD_CONFIG), so that the success reward alone is rare and dense step credit can matter.
PRESETS["toy-hard"] = dict(PRESETS["toy"], model="toy-hard", train_data="toy-hard", eval_data="toy-hard",
                           max_new_tokens=128, output_dir="runs/toy-hard")
# Bump when the task, the tokenizer or the training recipe changes, so that old caches are not reused.
WARM_START_VERSION = 1


def warm_start(cache_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """The warm-started toy policy as an HF folder (safetensors, tokenizer, generation_config), built once.

    `overrides` replace fields of FULL_CONFIG (e.g. `**CI_SIZE`, `**HARD_CONFIG`). The folder is
    `cache_dir/warm-seed{seed}-{hash of the configuration}`; it is built in a temporary folder beside it and
    renamed into place, so concurrent runs never see half a cache (the loser of a race discards its copy).
    Deterministic on CPU for a given seed, configuration and torch thread count.
    """
    unknown = sorted(set(overrides) - set(FULL_CONFIG))
    if unknown:
        raise ValueError(f"warm_start: unknown configuration fields {unknown}; known: {sorted(FULL_CONFIG)}")
    config = dict(FULL_CONFIG, **overrides)
    key = json.dumps({"version": WARM_START_VERSION, "seed": seed, **config}, sort_keys=True)
    folder = Path(cache_dir) / f"warm-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "toy.json").is_file():
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _build_warm_start(tmp, seed, config)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "toy.json").is_file():  # not a lost race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def sft_batch(rng: random.Random, tokenizer, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`config["batch_size"]` fresh noisy solutions as (input_ids, attention_mask, labels), each [batch, width].

    Right padding: positions start at 0 in every row, as they do in generate with left-padded prompts (position
    ids come from the attention mask there). Labels are -100 except on the solution and its final eos.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = []
    for _ in range(config["batch_size"]):
        start, ops = sample_chain(rng, rng.randint(config["min_ops"], config["max_ops"]))
        prompt = tokenizer.encode(data.format_prompt(tokenizer, expression(start, ops)))
        solution = tokenizer.encode(write_solution(
            start, ops, rng, config["slip_fraction"], config["redundant_fraction"],
            config["step_slip_fraction"])) + [eos]
        rows.append((prompt, solution))
    width = max(len(p) + len(s) for p, s in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, solution) in enumerate(rows):
        ids = prompt + solution
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(prompt):len(ids)] = torch.tensor(solution)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask, labels


def _build_warm_start(out: Path, seed: int, config: dict) -> None:
    """Supervised fine-tune of a fresh Qwen2 on noisy generated solutions; writes the HF folder `out`.

    The loss is next-token cross-entropy on the solution tokens and the final eos only (not the prompt).
    Every batch is fresh data from the "sft" stream, so the model cannot memorise solutions.
    """
    from transformers import GenerationConfig

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = fresh_qwen2(tokenizer, config)
    started = time.perf_counter()
    losses = supervised_fine_tune(model, tokenizer, seed, config)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "toy.json").write_text(json.dumps({
        "version": WARM_START_VERSION, "seed": seed, **config,
        "sft_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }, indent=2) + "\n")


def fresh_qwen2(tokenizer, config: dict):
    """A randomly initialised Qwen2ForCausalLM of the configuration's size over the toy vocabulary, in train mode
    (its initial weights come from torch's global RNG: seed it first)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"], num_key_value_heads=config["num_heads"],
        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        attention_dropout=0.0, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    model.train()
    return model


def supervised_fine_tune(model, tokenizer, seed: int, config: dict) -> list[float]:
    """`config["sft_steps"]` AdamW steps on fresh `sft_batch`es (lr `config["lr"]`, linear warm-up then cosine
    decay to 0, gradients clipped at norm 1); logs the recent loss ten times and returns every step's loss."""
    steps, lr = config["sft_steps"], config["lr"]
    warmup = max(1, min(100, steps // 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(f"toy-sft-{seed}")
    started, losses = time.perf_counter(), []
    for step in range(steps):
        input_ids, attention_mask, labels = sft_batch(rng, tokenizer, config)  # each [batch_size, width]
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"toy warm start: step {step + 1}/{steps} loss {recent:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return losses


# -------------------------------------------------------------------------------------------------
# Measuring a policy on held-out problems
# -------------------------------------------------------------------------------------------------


def measure_policy(model_dir: str | Path, items: list[dict], *, temperature: float = 0.0, max_new_tokens: int = 64,
                   batch_size: int = 100, seed: int = 0) -> dict:
    """Success rate, steps per response, response length (tokens, eos included) and truncated fraction of the
    policy in `model_dir` on `items`, one response each (`temperature` 0: greedy), by `eval.evaluate`.

    A truncated response (no eos within `max_new_tokens`) counts as a failure, as in PPO's success reward.
    """
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_model(str(model_dir)).eval()
    with rewards.AnswerChecker(num_workers=1) as checker:
        result = evaluation.evaluate(model, tokenizer, items, checker=checker, temperature=temperature,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    records = result["records"]  # one response each: its text, verdict and truncation are the first of each list
    return {"success": sum(r["correct"][0] and not r["truncated"][0] for r in records) / len(records),
            "steps": sum(len(rewards.split_steps(r["responses"][0])) for r in records) / len(records),
            "length": result["response_tokens"], "truncated": result["truncated"]}


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="toy.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("warm-start", help="build (or find) the cached warm start, then measure it "
                                "on 200 held-out problems (greedy and sampled at temperature 1)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--cache-dir", type=Path, default=models.default_cache_dir() / "toy",
                       help="cache folder (default: $PRM_PPO_CACHE/toy, else ~/.cache/prm-ppo/toy)")
    build.add_argument("--world", choices=sorted(WORLDS), default="toy", help="which toy world (default toy)")
    build.add_argument("--ci", action="store_true", help="the CI-sized model and SFT budget (CI_SIZE)")
    build.add_argument("--no-measure", action="store_true", help="only print the folder (build it if missing)")
    args = parser.parse_args(argv)

    world = WORLDS[args.world]
    folder = warm_start(args.cache_dir, args.seed, **dict(world, **(CI_SIZE if args.ci else {})))
    print(folder, flush=True)
    if args.no_measure:
        return
    held_out = problems(200, args.seed, "eval", world["min_ops"], world["max_ops"])
    for temperature in (0.0, 1.0):
        stats = measure_policy(folder, held_out, temperature=temperature,
                               max_new_tokens=PRESETS[args.world]["max_new_tokens"])
        print(("greedy " if temperature == 0 else "sampled (temperature 1) ")
              + " ".join(f"{k} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
