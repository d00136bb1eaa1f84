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
- `python toy.py report RUN_DIR...` turns runs' metrics.jsonl into the ablation table and plot (seeds of one
  experiment averaged on one row, with the first step that reaches a success rate);
  `python toy.py warm-start [--world toy-hard]` builds the cache ahead of time and measures the warm start;
  `python toy.py bench --advantage NAME` times scoring and the update of one saved toy rollout.
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
from dataclasses import dataclass
from pathlib import Path

import torch

import data
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
# The worlds by the name their preset, model and data source use (ppo.TOY_WORLDS).
WORLDS = {"toy": FULL_CONFIG, "toy-hard": HARD_CONFIG}
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
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"], num_key_value_heads=config["num_heads"],
        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        attention_dropout=0.0, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
    ))
    model.train()
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

    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=pad)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "toy.json").write_text(json.dumps({
        "version": WARM_START_VERSION, "seed": seed, **config,
        "sft_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------
# Measuring a policy on held-out problems
# -------------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(model_dir: str | Path, items: list[dict], *, greedy: bool, temperature: float = 1.0,
            max_new_tokens: int = 64, batch_size: int = 100, seed: int = 0) -> dict:
    """Success rate, steps per response, response length (tokens, eos included) and truncated fraction.

    A truncated response (no eos within `max_new_tokens`) counts as a failure, as in PPO's success reward.
    """
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_model(str(model_dir)).eval()
    stop_ids = models.stop_token_ids(model, tokenizer)
    torch.manual_seed(seed)
    success = steps = length = truncated = 0
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        prompts = [tokenizer.encode(data.format_prompt(tokenizer, item["problem"])) for item in batch]
        responses = models.generate(model, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                                    max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
        for item, ids in zip(batch, responses):
            finished = bool(ids) and ids[-1] in stop_ids
            text = tokenizer.decode(ids, skip_special_tokens=True)
            success += finished and rewards.extract_boxed(text) == item["answer"]
            steps += len(rewards.split_steps(text))
            length += len(ids)
            truncated += not finished
    n = len(items)
    return {"success": success / n, "steps": steps / n, "length": length / n, "truncated": truncated / n}


# -------------------------------------------------------------------------------------------------
# Ablation report
# -------------------------------------------------------------------------------------------------

REPORT_WINDOW = 10  # "start" and "end" are the means of the first and the last this many PPO steps
REPORT_COLUMNS = [("success", "reward/success"), ("steps per response", "response/steps"),
                  ("length (tokens)", "response/length"), ("truncated", "response/truncated")]
# The sample-efficiency column: the first step whose REPORT_WINDOW-step mean success reaches this.
DEFAULT_THRESHOLD = 0.5
# config.json fields that differ between the seeds of one experiment (or say nothing about it): ignored when
# runs are grouped.
NOT_THE_EXPERIMENT = {"seed", "output_dir", "resume", "wandb_project", "wandb_entity", "cache_dir"}


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config.json, the rows of metrics.jsonl) of one run, with errors that name the file and line."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise SystemExit(f"report: {path} not found")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"report: {config_path}: {err}") from err
    for key in ("reward", "alpha"):
        if key not in config:
            raise SystemExit(f"report: {config_path} has no '{key}'")
    rows = []
    for line_no, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"report: {metrics_path} line {line_no}: {err}") from err
        missing = [key for key in ("step", *(k for _, k in REPORT_COLUMNS)) if key not in row]
        if missing:
            raise SystemExit(f"report: {metrics_path} line {line_no} lacks {missing}")
        rows.append(row)
    if not rows:
        raise SystemExit(f"report: {metrics_path} has no rows")
    return config, sorted(rows, key=lambda r: r["step"])


def window_means(rows: list[dict], key: str) -> tuple[float, float]:
    """Means of `key` over the first and the last REPORT_WINDOW rows (overlapping when a run is short)."""
    first, last = rows[:REPORT_WINDOW], rows[-REPORT_WINDOW:]
    return sum(r[key] for r in first) / len(first), sum(r[key] for r in last) / len(last)


def first_step_reaching(rows: list[dict], threshold: float) -> int | None:
    """The first PPO step at which the mean success of the last REPORT_WINDOW steps (a full window) reaches
    `threshold`, or None. Example: success 0 at steps 1-10 and 1 from step 11 on reaches 0.5 at step 15
    (steps 6-15 hold five ones)."""
    success = [r["reward/success"] for r in rows]
    for i in range(REPORT_WINDOW - 1, len(rows)):
        if sum(success[i + 1 - REPORT_WINDOW:i + 1]) / REPORT_WINDOW >= threshold - 1e-9:  # rounding of sums
            return rows[i]["step"]
    return None


@dataclass
class RunGroup:
    """The runs of one experiment, one per seed (see `experiment_key`), cut to the steps they all have."""
    name: str  # the folders' common name without a seed suffix: success-gae-s0, success-gae-s1 -> success-gae
    config: dict  # the first run's config.json
    seeds: list[int]
    runs: list[list[dict]]  # each run's metric rows, sorted by step

    def means(self, key: str) -> tuple[float, float]:
        """(start, end) window means of `key`, averaged over the seeds."""
        pairs = [window_means(rows, key) for rows in self.runs]
        return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)

    def end_spread(self, key: str) -> float:
        """Sample standard deviation over the seeds of the end window mean of `key` (0 for one run)."""
        ends = [window_means(rows, key)[1] for rows in self.runs]
        if len(ends) < 2:
            return 0.0
        mean = sum(ends) / len(ends)
        return math.sqrt(sum((e - mean) ** 2 for e in ends) / (len(ends) - 1))


def experiment_key(config: dict, *also_ignored: str) -> str:
    """What makes runs seeds of one experiment: their config.json without NOT_THE_EXPERIMENT (and
    `also_ignored`); a toy warm start's folder counts without its seed and cache folder, since
    `--preset toy --seed N` warms up per seed."""
    kept = {k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT and k not in also_ignored}
    warm = re.fullmatch(r"warm-seed\d+-(\w+)", Path(str(kept.get("model", ""))).name)
    if warm:
        kept["model"] = f"toy warm start {warm.group(1)}"
    return json.dumps(kept, sort_keys=True)


def group_runs(runs: list[tuple[Path, dict, list[dict]]]) -> list[RunGroup]:
    """Runs of one experiment as one group each, in order of first appearance. A seed that a group already has
    opens another group (a rerun is shown beside the first, not averaged with it)."""
    groups: list[tuple[str, RunGroup, list[str]]] = []
    for run_dir, config, rows in runs:
        config.setdefault("advantage", "gae")  # runs that predate --advantage
        key, seed = experiment_key(config), config.get("seed", 0)
        found = next(((g, names) for k, g, names in groups if k == key and seed not in g.seeds), None)
        group, names = found or (RunGroup(run_dir.name, config, [], []), [])
        if found is None:
            groups.append((key, group, names))
        group.seeds.append(seed)
        group.runs.append(rows)
        names.append(run_dir.name)
    for _, group, names in groups:
        if len(names) > 1:
            group.name = re.sub(r"[-_]s?\d*$", "", os.path.commonprefix(names)) or group.name
        shortest = min(len(rows) for rows in group.runs)
        if any(len(rows) > shortest for rows in group.runs):
            print(f"report: {group.name}: its seeds ran {sorted({len(r) for r in group.runs})} steps; all are cut "
                  f"to the first {shortest}", file=sys.stderr)
            group.runs = [rows[:shortest] for rows in group.runs]
    return [group for _, group, _ in groups]


FAIL_SUCCESS_DROP = 0.1  # a run "fails" when its end success is this far below its `success` reference (verdict),
FAIL_STEPS_GROWTH = 1.0  # ... or its steps per response grow by more than this from start to end


def verdict(group: RunGroup, reference: RunGroup | None) -> str:
    """"fails: ..." / "holds" against `reference`, the `success` runs of the same configuration but the reward
    and alpha (so under the same estimator), "-" without them. Both sides are means over their seeds."""
    steps_start, steps_end = group.means("response/steps")
    reasons = [f"steps +{steps_end - steps_start:.1f}"] if steps_end - steps_start > FAIL_STEPS_GROWTH else []
    if reference is None:
        return "fails: " + reasons[0] if reasons else "-"
    drop = reference.means("reward/success")[1] - group.means("reward/success")[1]
    if drop > FAIL_SUCCESS_DROP + 1e-9:
        reasons.insert(0, f"success -{drop:.2f}")
    return "fails: " + ", ".join(reasons) if reasons else "holds"


def steps_to_threshold(group: RunGroup, threshold: float) -> str:
    """The sample-efficiency cell: the mean over seeds of `first_step_reaching`, then each seed's step."""
    reached = [first_step_reaching(rows, threshold) for rows in group.runs]
    each = ", ".join("not reached" if step is None else str(step) for step in reached)
    if len(reached) == 1:
        return each
    if None in reached:
        return f"{len(reached) - reached.count(None)} of {len(reached)} ({each})"
    return f"{sum(reached) / len(reached):.0f} ({each})"


def table_row(group: RunGroup, reference: RunGroup | None, threshold: float) -> list[str]:
    config = group.config
    alpha = "-" if config["reward"] == "success" else f"{config['alpha']:g}"
    minutes = sum(sum(r.get("time/step", 0.0) for r in rows) for rows in group.runs) / len(group.runs) / 60
    cells = [group.name, str(config["reward"]), alpha, config["advantage"], ", ".join(map(str, group.seeds)),
             str(min(rows[-1]["step"] for rows in group.runs)), f"{minutes:.1f}"]
    for _, key in REPORT_COLUMNS:
        start, end = group.means(key)
        digits = 1 if key in ("response/steps", "response/length") else 2
        spread = f" +- {group.end_spread(key):.2f}" if key == "reward/success" and len(group.runs) > 1 else ""
        cells.append(f"{start:.{digits}f} -> {end:.{digits}f}{spread}")
    # The area under the learning curve: a second measure of how fast a reward teaches, over the whole run.
    mean_success = sum(sum(r["reward/success"] for r in rows) / len(rows) for rows in group.runs) / len(group.runs)
    return cells + [f"{mean_success:.3f}", steps_to_threshold(group, threshold), verdict(group, reference)]


def report(run_dirs: list[Path], out: Path | None, threshold: float = DEFAULT_THRESHOLD) -> str:
    """Markdown table of the runs, seeds of one experiment on one row (and a PNG plot beside `out` when
    matplotlib is installed).

    A row's numbers are means over its seeds; in the success cell, "+-" gives the sample standard deviation
    of the end success over the seeds. "mean success" is over all steps of a run (the area under its curve).
    "minutes" counts PPO steps only (model loading excluded), per run.
    Runs without an `advantage` in config.json predate --advantage and read as `gae`. The last column judges
    each row against the `success` row of the same configuration but the reward (see `verdict`).
    """
    groups = group_runs([(run_dir, *read_run(run_dir)) for run_dir in run_dirs])
    success = {experiment_key(g.config, "reward", "alpha"): g for g in groups if g.config["reward"] == "success"}
    header = ["run", "reward", "alpha", "advantage", "seeds", "PPO steps", "minutes",
              *(name for name, _ in REPORT_COLUMNS), "mean success", f"steps to {threshold:g}", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group in groups:
        reference = None if group.config["reward"] == "success" else success.get(
            experiment_key(group.config, "reward", "alpha"))
        lines.append("| " + " | ".join(table_row(group, reference, threshold)) + " |")
    table = "\n".join(lines) + "\n"
    if out is None:
        return table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    try:
        import matplotlib
    except ImportError:
        print("report: matplotlib is not installed (pip install -e '.[plot]'), no plot written", file=sys.stderr)
        return table
    plot(groups, out.with_suffix(".png"))
    return table


def plot(groups: list[RunGroup], path: Path) -> None:
    """Success rate and steps per response against PPO step, one row of two panels per estimator: the mean over
    a row's seeds, the range between its lowest and highest seed shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smoothed(values: list[float], width: int = 5) -> list[float]:  # one rollout's rate is noisy (+-0.06)
        return [sum(values[max(0, i + 1 - width):i + 1]) / len(values[max(0, i + 1 - width):i + 1])
                for i in range(len(values))]

    estimators = list(dict.fromkeys(group.config["advantage"] for group in groups))
    fig, axes = plt.subplots(len(estimators), 2, figsize=(11, 4 * len(estimators)), squeeze=False)
    for (ax_success, ax_steps), estimator in zip(axes, estimators):
        for group in groups:
            if group.config["advantage"] != estimator:
                continue
            label = str(group.config["reward"])
            if group.config["reward"] != "success":
                label += f" (alpha {group.config['alpha']:g})"
            if len(group.runs) > 1:
                label += f", {len(group.runs)} seeds"
            steps = [r["step"] for r in group.runs[0]]  # group_runs cut every seed to the steps they all have
            for ax, key in ((ax_success, "reward/success"), (ax_steps, "response/steps")):
                curves = [smoothed([r[key] for r in rows]) for rows in group.runs]
                mean = [sum(values) / len(values) for values in zip(*curves)]
                line, = ax.plot(steps, mean, label=label)
                if len(curves) > 1:
                    ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
        suffix = f" [{estimator}]" if len(estimators) > 1 else ""
        ax_success.set(xlabel="PPO step", ylabel="success rate (mean of 5 steps)" + suffix, ylim=(0, 1))
        ax_steps.set(xlabel="PPO step", ylabel="steps per response (mean of 5 steps)" + suffix)
        ax_steps.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------
# Timing one PPO step's scoring and update on a saved rollout
# -------------------------------------------------------------------------------------------------


def bench(advantage: str, rollout_path: Path, repeats: int, cache_dir: Path) -> dict[str, float]:
    """Median seconds of `ppo.score` and `ppo.train_on_rollout` (rewards, advantages, update, metrics) over
    `repeats` passes on one toy rollout (preset toy, clip_delta): the phases that a critic adds to.

    The rollout (sampled responses and their grades, no scores) is sampled with seed 0 and saved to
    `rollout_path` the first time, so every estimator is timed on the same responses.
    """
    import ppo

    cfg = ppo.parse_config(["--preset", "toy", "--reward", "clip_delta", "--advantage", advantage,
                            "--cache-dir", str(cache_dir), "--output-dir", tempfile.mkdtemp(prefix="toy-bench-")])
    ppo.validate(cfg, world=1)
    ppo.resolve_local_models(cfg, rank=0)
    run = ppo.setup(cfg, 0, 1, torch.device("cpu"))
    if not rollout_path.is_file():
        with rewards.AnswerChecker(1, cfg.answer_timeout) as checker:
            run.checker = checker
            prompts, _ = data.tokenize_prompts(run.tokenizer, problems(cfg.prompts_per_step, seed=0), 64)
            torch.manual_seed(0)
            ro = ppo.rollout(cfg, prompts, run)
        rollout_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in ro.items() if k not in ("time", "old_logp", "ref_logp", "values")}, rollout_path)
    saved = torch.load(rollout_path, weights_only=True)
    times: dict[str, list[float]] = {"score": [], "update": []}
    for _ in range(repeats):
        ro = dict(saved, time={"time/rollout": 0.0, "time/score": 0.0})
        start = time.perf_counter()
        ppo.score(cfg, ro, run)
        scored = time.perf_counter()
        ppo.train_on_rollout(cfg, 1, ro, run)
        times["score"].append(scored - start)
        times["update"].append(time.perf_counter() - scored)
    return {phase: sorted(t)[len(t) // 2] for phase, t in times.items()}


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
    rep = commands.add_parser("report", help="markdown table (and PNG plot) of PPO runs' metrics.jsonl")
    rep.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None,
                     help="write the table here and the plot beside it (same name, .png); default: print the table")
    rep.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="success rate of the sample-efficiency column: the first step whose "
                     f"{REPORT_WINDOW}-step mean reaches it (default {DEFAULT_THRESHOLD})")
    timing = commands.add_parser("bench", help="median seconds of scoring and the update of one saved toy rollout")
    timing.add_argument("--advantage", default="gae", help="the --advantage to time (default gae)")
    timing.add_argument("--rollout", type=Path, default=Path("runs/toy-bench/rollout.pt"),
                        help="the saved rollout; sampled (seed 0) and saved here when missing")
    timing.add_argument("--repeats", type=int, default=10, help="passes over the rollout; the median is printed")
    timing.add_argument("--cache-dir", type=Path, default=models.default_cache_dir())
    args = parser.parse_args(argv)

    if args.command == "bench":
        seconds = bench(args.advantage, args.rollout, args.repeats, args.cache_dir)
        print(json.dumps({"advantage": args.advantage, **{f"seconds/{k}": round(v, 4) for k, v in seconds.items()}}))
        return
    if args.command == "report":
        table = report(args.run_dirs, args.out, args.threshold)
        print(table if args.out is None else f"wrote {args.out}", end="" if args.out is None else "\n")
        return
    world = WORLDS[args.world]
    folder = warm_start(args.cache_dir, args.seed, **dict(world, **(CI_SIZE if args.ci else {})))
    print(folder, flush=True)
    if args.no_measure:
        return
    import ppo

    held_out = problems(200, args.seed, "eval", world["min_ops"], world["max_ops"])
    for greedy in (True, False):
        stats = measure(folder, held_out, greedy=greedy, max_new_tokens=ppo.PRESETS[args.world]["max_new_tokens"])
        print(("greedy " if greedy else "sampled (temperature 1) ")
              + " ".join(f"{k} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
