"""Train your own process reward model the way the paper's was made: Math-Shepherd step labels, then a step-tag PRM.

    python prm.py label    --preset toy --problems 400 --samples 4 --completions 8 --output-dir runs/prm
    python prm.py train    --preset toy --labels runs/prm/labels.jsonl --output-dir runs/prm      # -> runs/prm/prm
    python prm.py evaluate --preset toy --prm runs/prm/prm --labels HELD_OUT.jsonl --train-labels runs/prm/labels.jsonl
    python ppo.py --preset toy --prm runs/prm/prm --reward clip_delta                           # RL with it

What the algorithm is (Math-Shepherd, Wang et al., arXiv 2312.08935; the PRM of arXiv 2410.15115 was made so):
- label: sample --samples solutions per problem from a generator. For the prefix made of a solution's first k
  steps (k < K), sample --completions continuations from a completer (default: the generator) and record the
  fraction that end in a success (prefix + completion correct and not truncated, within --max-new-tokens in
  all): the soft label of step k; the hard label is whether any does. The last step's prefix is the finished
  solution: its label is the solution's own success, nothing sampled. Truncated and step-less solutions are
  dropped (counted). Every problem is sampled under a seed of its own (--seed, problem id), so the labels do not
  depend on the number of ranks; ranks take problems in turn (each holds the whole generator, as data-parallel
  inference does) and append to their own shard as each problem finishes; a rerun skips what is done. The shards
  are merged into labels.jsonl, one row per solution: problem_id, problem, answer, steps, soft_labels,
  hard_labels, correct.
- train: a causal LM (the policy's weights by default) learns P(good) at each step tag: the Math-Shepherd input
  `question step_1 ки\\nstep_2 ки...`, cross-entropy over the two label tokens (`+` good, `-` bad) at the tag
  positions only, against hard labels (or the soft ones, --soft-labels). The tag must be one token in context, so
  it (and a label token that is not one token) is added to the tokenizer and the embeddings are resized. Reads
  our labels.jsonl or the public Math-Shepherd dataset's layout (`input` with `ки` tags, `label` with `+`/`-`,
  e.g. --labels peiyi9979/Math-Shepherd). Problems are split into training and held-out sets; after each epoch
  one line of prm-metrics.jsonl holds the training loss and the held-out loss, step accuracy and step AUC. The
  folder <output-dir>/prm is what `ppo.py --prm` loads (format step_tag), checked through rewards.StepTagPRM.
- evaluate: any --prm (a trained folder, a hub PRM, or a function such as the toy's toy:step_verifier): step AUC
  and accuracy against held-out labels (and against each --truth function), and best-of-N on held-out problems
  (disjoint by text from --train-labels): N solutions reranked by the PRM's min, product or last step score,
  against majority vote and one random sample.

Under torchrun, label splits the problems and train shards the model with FSDP2 (models.py), averaging over all
ranks' tags so that the loss does not depend on the number of ranks.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import models
import ppo
import rewards
import toy
from cli import arg, config_parser

STEP_TAG, GOOD, BAD = "ки", "+", "-"  # rewards.StepTagPRM's defaults: what `ppo.py --prm FOLDER` reads
LABEL_FILE, META_FILE, METRICS_FILE = "labels.jsonl", "labels-meta.json", "prm-metrics.jsonl"


# -------------------------------------------------------------------------------------------------
# Configs: one per subcommand, sharing the run-level fields a --preset fills in
# -------------------------------------------------------------------------------------------------


@dataclass
class Common:
    preset: str | None = arg(None, "a ppo.py preset (toy, toy-hard, tiny, qwen2.5-math-1.5b, ...) whose --model, "
                                   "--train-data, --max-new-tokens and --temperature are the defaults here")
    model: str | None = arg(None, "the policy: label's generator, train's starting weights, evaluate's sampler")
    data: str | None = arg(None, "problems, as ppo.py's --train-data (label; evaluate draws held-out ones)")
    max_new_tokens: int | None = arg(None, "response length limit: a solution (prefix + completion) without EOS "
                                           "by then is truncated, a failure")
    temperature: float | None = arg(None, "sampling temperature (top-k, top-p and repetition penalty off)")
    step_delimiter: str = arg("\n\n", "text that separates reasoning steps")
    seed: int = arg(0, "seed of the problems' sampling and of the split and order of training")
    batch_size: int = arg(64, "sequences generated at once per rank")
    cache_dir: str = arg(str(models.default_cache_dir()), "where locally built models (tiny, toy) are cached")
    output_dir: str = arg("runs/prm", "where everything is written")


@dataclass
class LabelConfig(Common):
    problems: int = arg(200, "problems to label (the first N of --data)")
    samples: int = arg(4, "solutions sampled per problem")
    completions: int = arg(8, "continuations sampled from each step prefix")
    completer: str | None = arg(None, "the model that completes prefixes; default: the generator (--model)")
    answer_workers: int = arg(2, "processes grading answers in parallel (per rank)")
    answer_timeout: float = arg(10.0, "seconds before an answer check is killed and counted incorrect")


@dataclass
class TrainConfig(Common):
    labels: str = arg("runs/prm/labels.jsonl", "step labels: our labels.jsonl, or a .jsonl/.json/.parquet file or "
                                               "hub dataset in Math-Shepherd's layout (input, label)")
    epochs: int = arg(3, "passes over the training split")
    lr: float = arg(1e-5, "AdamW learning rate (constant after --warmup-steps)")
    warmup_steps: int = arg(0, "linear learning-rate warm-up, in optimiser steps")
    batch_tokens: int = arg(8192, "padded tokens per optimiser step, over all ranks")
    soft_labels: bool = arg(False, "train on the soft labels (fraction of completions that succeed) as targets")
    heldout_fraction: float = arg(0.1, "fraction of problems held out for the per-epoch metrics")
    precision: str | None = arg(None, "bf16 or fp32, as ppo.py's (default: bf16 on CUDA, fp32 on CPU)")


@dataclass
class EvaluateConfig(Common):
    prm: str = arg("runs/prm/prm", "the PRM to measure: a folder or hub id (as ppo.py's --prm) or module:function")
    labels: str | None = arg(None, "held-out labels.jsonl for step AUC and accuracy")
    truth: str | None = arg(None, "more step verdicts to hold the PRM against: comma-separated module:function with "
                                  "the PRM interface, a score >= 0.5 meaning a good step (toy: toy:prefix_correct)")
    train_labels: str | None = arg(None, "the PRM's training labels: their problems are excluded from best-of-N")
    bon_problems: int = arg(200, "held-out problems for best-of-N (0: none)")
    bon_samples: int = arg(8, "N: solutions sampled per problem for best-of-N")
    answer_workers: int = arg(2, "processes grading answers in parallel")
    answer_timeout: float = arg(10.0, "seconds before an answer check is killed and counted incorrect")


def parse_config(argv: list[str]):
    """`label|train|evaluate` and its flags -> (the subcommand, its config), the preset's defaults filled in."""
    commands = {"label": LabelConfig, "train": TrainConfig, "evaluate": EvaluateConfig}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python prm.py {{{','.join(commands)}}} [flags] (see --help of each)")
    parser = config_parser(commands[argv[0]], f"prm.py {argv[0]}: " + __doc__.split("\n\n")[0])
    cfg = commands[argv[0]](**vars(parser.parse_args(argv[1:])))
    if cfg.preset is not None and cfg.preset not in ppo.PRESETS:
        parser.error(f"--preset: unknown '{cfg.preset}'; choose one of {', '.join(ppo.PRESETS)}")
    preset = {**{f: getattr(ppo.Config, f) for f in ("model", "train_data", "max_new_tokens", "temperature")},
              **ppo.PRESETS.get(cfg.preset, {})}
    cfg.model = cfg.model or preset["model"]
    cfg.data = cfg.data or preset["train_data"]
    cfg.max_new_tokens = cfg.max_new_tokens or preset["max_new_tokens"]
    cfg.temperature = preset["temperature"] if cfg.temperature is None else cfg.temperature
    cfg.step_delimiter = cfg.step_delimiter.replace("\\n", "\n")
    for flag in ("problems", "samples", "completions", "epochs", "batch_tokens", "bon_samples", "batch_size"):
        if getattr(cfg, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(cfg, flag)}")
    if isinstance(cfg, TrainConfig):
        cfg.precision = cfg.precision or models.default_precision()
        ppo.validate_choice("--precision", cfg.precision, ("bf16", "fp32"))
    return argv[0], cfg


def local_model(name: str, cfg: Common, rank: int = 0) -> str:
    """A model name as ppo.py reads it: `tiny` and the toy worlds are built locally (cached), the rest as given.
    Rank 0 builds first; the other ranks then find the cache (as ppo.resolve_local_models)."""
    path = name
    for turn in range(2):
        if (turn == 0) == (rank == 0):
            if name == "tiny":
                path = str(models.build_tiny(Path(cfg.cache_dir) / "tiny")["policy"])
            elif name in toy.WORLDS:
                path = str(toy.warm_start(Path(cfg.cache_dir) / "toy", cfg.seed, **toy.WORLDS[name]))
        models.barrier()
    return path


def load_problems(source: str, split: str, seed: int) -> list[dict]:
    """Problems as ppo.py loads them for that split (`--data`)."""
    return ppo.load_problems(source, split, types.SimpleNamespace(seed=seed, problem_field="problem",
                                                                  answer_field="answer", skip_bad_rows=False))


# -------------------------------------------------------------------------------------------------
# label: Math-Shepherd's automatic step labels
# -------------------------------------------------------------------------------------------------

# (text, truncated) of one sampled solution or completion
Sample = tuple[str, bool]


def label_problem(problem: dict, solutions: list[Sample], complete: Callable[[list[str]], list[list[Sample]]],
                  grade: Callable[[list[str], str], list[bool]], delimiter: str) -> tuple[list[dict], Counter]:
    """The labelled rows of one problem's sampled `solutions`, and what was dropped.

    complete(prefixes) -> for each prefix text, its sampled completions; grade(texts, gold) -> correct per text.
    The prefix of step k is the first k steps joined by the delimiter, plus one (where step k+1 would start).
    Example: a solution "1+1=2\\n\\n\\boxed{2}" (right) whose one prefix "1+1=2\\n\\n" has completions
    ["\\boxed{2}", "\\boxed{3}"] gives soft_labels [0.5, 1.0], hard_labels [1, 1], correct True.
    """
    kept, dropped = [], Counter()
    for text, truncated in solutions:
        steps = rewards.split_steps(text, delimiter)
        if truncated or not steps:
            dropped["truncated" if truncated else "no_steps"] += 1
        else:
            kept.append((text, steps))
    prefixes = [delimiter.join(steps[:k]) + delimiter for _, steps in kept for k in range(1, len(steps))]
    completions = complete(prefixes) if prefixes else []
    finished = [prefix + text for prefix, samples in zip(prefixes, completions) for text, _ in samples]
    correct = grade([text for text, _ in kept] + finished, problem["answer"]) if kept else []
    own, completed = correct[:len(kept)], iter(correct[len(kept):])
    success = iter([[ok and not truncated for (_, truncated), ok in zip(samples, completed)]
                    for samples in completions])
    rows = []
    for (_, steps), ok in zip(kept, own):
        soft = [sum(done) / len(done) for done in (next(success) for _ in steps[:-1])] + [float(ok)]
        rows.append({"problem_id": problem["problem_id"], "problem": problem["problem"], "answer": problem["answer"],
                     "steps": steps, "soft_labels": soft, "hard_labels": [int(s > 0) for s in soft],
                     "correct": bool(ok)})
    return rows, dropped


class Sampler:
    """Sampling from a causal LM as ppo.py does: prompts in the model's chat format, --temperature, responses of at
    most --max-new-tokens tokens (a prefix's completion: what the prefix leaves of them)."""

    def __init__(self, name: str, cfg: Common, device: torch.device):
        self.tokenizer = models.load_tokenizer(name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = models.load_model(name, dtype=dtype, device=device).eval().requires_grad_(False)
        self.stop_ids = models.stop_token_ids(self.model, self.tokenizer)
        self.cfg = cfg

    def prompt_ids(self, problem: str) -> list[int]:
        return data.tokenize_prompts(self.tokenizer, [{"problem": problem}])[0][0]["prompt_ids"]

    def __call__(self, problem: str, prefixes: list[str], n: int) -> list[list[Sample]]:
        """n samples after each prefix of the response (the empty prefix: whole solutions)."""
        prompt = self.prompt_ids(problem)
        rows = []
        for prefix in prefixes:
            ids = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
            rows += [(prompt + ids, self.cfg.max_new_tokens - len(ids))] * n
        out: list[Sample] = []
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start:start + self.cfg.batch_size]
            budget = max(1, max(b for _, b in chunk))
            responses = models.generate(self.model, [ids for ids, _ in chunk], pad_id=self.tokenizer.pad_token_id,
                                        stop_ids=self.stop_ids, max_new_tokens=budget, temperature=self.cfg.temperature)
            for (_, left), response in zip(chunk, responses):
                response = response[:max(left, 0)]
                truncated = not response or response[-1] not in self.stop_ids
                out.append((self.tokenizer.decode(response, skip_special_tokens=True), truncated))
        return [out[i * n:(i + 1) * n] for i in range(len(prefixes))]


def label(cfg: LabelConfig) -> Path:
    rank, world, device = models.init_distributed("fp32")
    out = Path(cfg.output_dir)
    cfg.model = local_model(cfg.model, cfg, rank)
    cfg.completer = local_model(cfg.completer, cfg, rank) if cfg.completer else cfg.model
    check_meta(out, cfg, rank)
    problems = [dict(p, problem_id=i) for i, p in enumerate(load_problems(cfg.data, "train", cfg.seed))]
    if len(problems) < cfg.problems:
        raise SystemExit(f"--problems {cfg.problems}: --data {cfg.data} has only {len(problems)}")
    done = finished_ids(out, rank)
    todo = [p for p in problems[:cfg.problems] if p["problem_id"] % world == rank and p["problem_id"] not in done]
    generator = Sampler(cfg.model, cfg, device)
    completer = generator if cfg.completer == cfg.model else Sampler(cfg.completer, cfg, device)
    with rewards.AnswerChecker(cfg.answer_workers, cfg.answer_timeout) as checker, \
            open(out / f"labels.rank{rank}.jsonl", "a") as shard:
        for problem in tqdm(todo, desc=f"label (rank {rank})", disable=rank != 0 and world > 1):
            torch.manual_seed(cfg.seed * 1_000_003 + problem["problem_id"])  # the problem's own stream
            solutions = generator(problem["problem"], [""], cfg.samples)[0]
            rows, dropped = label_problem(problem, solutions,
                                          lambda prefixes: completer(problem["problem"], prefixes, cfg.completions),
                                          lambda texts, gold: checker(texts, [gold] * len(texts)), cfg.step_delimiter)
            shard.write(json.dumps({"problem_id": problem["problem_id"], "rows": rows, "dropped": dropped}) + "\n")
            shard.flush()
    models.barrier()
    path = merge_shards(out, cfg.problems) if rank == 0 else out / LABEL_FILE
    models.barrier()
    return path


def check_meta(out: Path, cfg: LabelConfig, rank: int) -> None:
    """Labels continue only under the settings they were made with: a changed one is refused, naming its flag."""
    meta = {"model": cfg.model, "completer": cfg.completer, "samples": cfg.samples, "completions": cfg.completions,
            "data": cfg.data, "seed": cfg.seed, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "step_delimiter": cfg.step_delimiter}
    path = out / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in meta.items():
            if old.get(key) != value:
                raise SystemExit(f"--{key.replace('_', '-')}: the labels in {out} were made with {old.get(key)!r}, "
                                 f"not {value!r}; use another --output-dir")
    models.barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1) + "\n")
    models.barrier()


def read_shard(path: Path, repair: bool) -> list[dict]:
    """The finished problems of one shard; a torn last line (a run cut off mid-write) is dropped, and with
    `repair` cut from the file so that appending continues cleanly."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise SystemExit(f"{path}: line {i + 1} is not JSON (only a last line can be torn)") from None
            if repair:
                path.write_text("".join(lines[:-1]))
    return entries


def finished_ids(out: Path, rank: int) -> set[int]:
    """Problem ids labelled in any shard (a rerun may use another number of ranks); this rank repairs its own."""
    read_shard(out / f"labels.rank{rank}.jsonl", repair=True)
    models.barrier()
    return {e["problem_id"] for path in out.glob("labels.rank*.jsonl") for e in read_shard(path, repair=False)}


def merge_shards(out: Path, n_problems: int) -> Path:
    """labels.jsonl from every shard, one row per solution by problem id, and a summary line printed."""
    entries = {e["problem_id"]: e for path in sorted(out.glob("labels.rank*.jsonl"))
               for e in read_shard(path, repair=False) if e["problem_id"] < n_problems}
    rows = [row for pid in sorted(entries) for row in entries[pid]["rows"]]
    dropped = sum((Counter(e["dropped"]) for e in entries.values()), Counter())
    tmp = out / (LABEL_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out / LABEL_FILE)
    steps = [s for row in rows for s in row["hard_labels"]]
    print(f"labels: {len(entries)} problems, {len(rows)} solutions ({sum(r['correct'] for r in rows)} correct), "
          f"{len(steps)} steps ({sum(steps)} labelled good); dropped {dropped['truncated']} truncated and "
          f"{dropped['no_steps']} step-less solutions -> {out / LABEL_FILE}")
    return out / LABEL_FILE


# -------------------------------------------------------------------------------------------------
# train: a step-tag PRM
# -------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One labelled solution as the PRM reads it."""

    problem: str  # the question: the held-out split is by problem
    text: str  # the Math-Shepherd input: question, then every step followed by " ки"
    ends: list[int]  # the character index just past each tag
    targets: list[float]  # P(good) to learn per step: the hard label, or the soft one
    hard: list[int]  # the hard label per step (accuracy, AUC)
    steps: list[str]  # the step texts
    row: dict | None = None  # the labels.jsonl row it came from (None: Math-Shepherd's layout)


def read_examples(source: str, soft: bool) -> list[Example]:
    """--labels as Examples: our labels.jsonl rows, or rows in Math-Shepherd's layout (input, label)."""
    try:
        if Path(source).is_file():
            rows = [(where, row) for where, row, _ in data._local_rows(Path(source), "problem", "answer")]
        else:  # a hub dataset (peiyi9979/Math-Shepherd), or a local folder in its layout
            from datasets import load_dataset

            rows = [(f"{source} row {i}", row) for i, row in enumerate(load_dataset(source, split="train"))]
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise SystemExit(f"--labels {source}: cannot read it ({err})") from err
    examples = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise SystemExit(f"--labels: {where} is not a JSON object")
        if "steps" in row:
            text, ends = rewards.step_tag_text(row["problem"], row["steps"], STEP_TAG)
            hard = [int(h) for h in row["hard_labels"]]
            examples.append(Example(row["problem"], text, ends, [float(s) for s in row["soft_labels"]] if soft
                                    else [float(h) for h in hard], hard, row["steps"], row))
        elif "input" in row and "label" in row:
            examples.append(math_shepherd_example(row["input"], row["label"], where))
        else:
            raise SystemExit(f"--labels: {where} has neither steps/hard_labels nor input/label")
    if not examples:
        raise SystemExit(f"--labels {source}: no rows")
    return examples


def math_shepherd_example(text: str, label: str, where: str) -> Example:
    """A Math-Shepherd row: `input` tags each step with `ки`, `label` is the same text with `+` or `-` in place of
    each tag. The question is the text before "Step 1:" (or before the first step's text).

        math_shepherd_example("2+2? Step 1: 4 ки", "2+2? Step 1: 4 +", "row 0") -> ends [17], targets [1.0]
    """
    segments = text.split(STEP_TAG)
    ends, hard, at, label_at = [], [], 0, 0  # at: in the input; label_at: the same place in the label
    for k, segment in enumerate(segments[:-1]):
        at, label_at = at + len(segment) + len(STEP_TAG), label_at + len(segment) + 1
        verdict = label[label_at - 1:label_at]
        if verdict not in (GOOD, BAD):
            raise SystemExit(f"--labels: {where}: its label has {verdict!r}, not + or -, where its input has step "
                             f"tag {k + 1}")
        ends.append(at)
        hard.append(int(verdict == GOOD))
    if not ends:
        raise SystemExit(f"--labels: {where}: its input has no step tag {STEP_TAG!r}")
    steps = [segment.strip() for segment in segments[:-1]]
    question, marker, first = segments[0].partition("Step 1:")
    if marker:
        question, steps[0] = question.strip(), (marker + first).strip()
    return Example(question, text, ends, [float(h) for h in hard], hard, steps)


def split_by_problem(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out): a seeded `fraction` of the distinct problems, all their solutions, is held out."""
    problems = sorted({e.problem for e in examples})
    random.Random(f"prm-split-{seed}").shuffle(problems)
    held = set(problems[:round(fraction * len(problems))] if len(problems) > 1 else [])
    return [e for e in examples if e.problem not in held], [e for e in examples if e.problem in held]


def add_tag_tokens(tokenizer) -> list[str]:
    """Make the step tag one token in context and the label tokens one token each, adding those that are not
    (the toy tokenizer has no `ки`; Qwen2's splits " ки" in two). Returns what was added."""
    from tokenizers import AddedToken

    def one_token(text: str, context: str) -> bool:
        encoding = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False)
        alone = tokenizer.encode(text, add_special_tokens=False)
        ends = {end: t for t, (_, end) in enumerate(encoding["offset_mapping"])}
        t = ends.get(len(context))
        return len(alone) == 1 and t is not None and encoding["input_ids"][t] == alone[0]

    added = [text for text, context in ((STEP_TAG, "1+1=2 " + STEP_TAG), (GOOD, GOOD), (BAD, BAD))
             if not one_token(text, context)]
    tokenizer.add_tokens([AddedToken(text, normalized=False, single_word=False) for text in added])
    return added


def batches(encoded: list[tuple[list[int], list[int]]], batch_tokens: int, seed: int) -> list[list[int]]:
    """Row indices in batches of similar length under `batch_tokens` padded tokens, in a seeded order."""
    out = rewards._length_sorted_batches([len(ids) for ids, _ in encoded], batch_tokens)
    random.Random(seed).shuffle(out)
    return out


def _tag_head(model, input_ids, attention_mask, rows, columns):
    """rewards.tag_logits as a method of the PRM being trained: under FSDP2 it is registered as a forward method,
    so the root's parameters (embedding, LM head) are gathered for it."""
    return rewards.tag_logits(model, {"input_ids": input_ids, "attention_mask": attention_mask},
                              list(zip(rows, columns)), model.label_ids).float()


def run_batch(model, adapter, encoded, targets, batch: list[int], rank: int, world: int):
    """This rank's share of a batch (every world-th row; a rank left without one runs a row at weight 0, since
    FSDP2's collectives need every rank) -> (good-vs-bad logits [N, 2], targets [N], weight 0 or 1)."""
    mine = batch[rank::world]
    weight = 1.0 if mine else 0.0
    mine = mine or batch[:1]
    padded, at = adapter.pad([encoded[i] for i in mine])
    rows, columns = zip(*at)
    logits = model.tag_head(padded["input_ids"].to(adapter.device), padded["attention_mask"].to(adapter.device),
                            torch.tensor(rows), torch.tensor(columns))
    return logits, torch.tensor([t for i in mine for t in targets[i]], device=logits.device), weight


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per tag [N] of P(good) = softmax(logits)[:, 0] against targets in [0, 1] (hard or soft)."""
    logp = logits.log_softmax(-1)
    return -(targets * logp[:, 0] + (1 - targets) * logp[:, 1])


def train_epoch(model, adapter, optimizer, scheduler, train_set, cfg: TrainConfig, epoch: int) -> float:
    """One pass; returns the mean training loss per tag over all ranks. The loss of a batch is its summed
    cross-entropy over the whole batch's tag count (all ranks), times the number of ranks, because FSDP2 averages
    gradients over ranks: the gradient is that of one process on the whole batch."""
    encoded, targets = train_set
    rank, world = dist.get_rank() if dist.is_initialized() else 0, models.world_size()
    total, tags = 0.0, 0
    model.train()
    for batch in tqdm(batches(encoded, cfg.batch_tokens, cfg.seed * 1000 + epoch), desc=f"prm epoch {epoch}",
                      disable=rank != 0, leave=False):
        n = sum(len(targets[i]) for i in batch)
        logits, target, weight = run_batch(model, adapter, encoded, targets, batch, rank, world)
        loss = cross_entropy(logits, target).sum() * weight
        (loss * world / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += models.all_reduce(loss.detach().double()).item()
        tags += n
    return total / tags


@torch.no_grad()
def held_out_metrics(model, adapter, held_set, cfg: TrainConfig) -> dict:
    """Loss, step accuracy (P(good) >= 0.5 against the hard label) and step AUC on the held-out split."""
    encoded, targets, hard = held_set
    if not encoded:
        return {"heldout_loss": math.nan, "heldout_accuracy": math.nan, "heldout_auc": math.nan}
    rank, world = dist.get_rank() if dist.is_initialized() else 0, models.world_size()
    model.eval()
    scored: list[tuple[float, int, float]] = []  # (P(good), hard label, cross-entropy) per tag of this rank
    for batch in rewards._length_sorted_batches([len(ids) for ids, _ in encoded], cfg.batch_tokens):
        logits, target, weight = run_batch(model, adapter, encoded, targets, batch, rank, world)
        if weight:
            mine = [h for i in batch[rank::world] for h in hard[i]]
            scored += zip(logits.softmax(-1)[:, 0].tolist(), mine, cross_entropy(logits, target).tolist())
    every = [None] * world
    dist.all_gather_object(every, scored) if dist.is_initialized() else every.__setitem__(0, scored)
    p, labels, losses = zip(*[s for part in every for s in part])
    return {"heldout_loss": sum(losses) / len(losses),
            "heldout_accuracy": sum((q >= 0.5) == bool(h) for q, h in zip(p, labels)) / len(p),
            "heldout_auc": auc(p, labels)}


def auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a good step > score of a bad one), ties counting half; NaN when the
    labels hold one class only.

        auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) -> (1 + 1 + 0.5 + 1) / 4 = 0.875
    """
    pairs = sorted(zip(scores, labels))
    good = sum(1 for _, y in pairs if y)
    bad = len(pairs) - good
    if not good or not bad:
        return math.nan
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks (1-based) over runs of equal scores
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += sum(1 for _, y in pairs[i:j] if y) * (i + j + 1) / 2
        i = j
    return (rank_sum - good * (good + 1) / 2) / (good * bad)


def prepare_model(cfg: TrainConfig, device: torch.device):
    """The starting model with the tag tokens added (embeddings resized), sharded under torchrun or bf16, the
    step-tag adapter that encodes its inputs, and its optimiser."""
    tokenizer = models.load_tokenizer(cfg.model)
    known = len(tokenizer)
    added = add_tag_tokens(tokenizer)
    model = models.load_model(cfg.model)
    if added:  # new rows (or unused ones past the old vocabulary) start at the mean of the known tokens' rows
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                matrix.weight[known:len(tokenizer)] = matrix.weight[:known].mean(0)
    adapter = rewards.StepTagPRM(model, tokenizer, STEP_TAG, GOOD, BAD, batch_tokens=cfg.batch_tokens)
    model.label_ids = [adapter.good_id, adapter.bad_id]
    model.tag_head = types.MethodType(_tag_head, model)
    if dist.is_initialized():
        from torch.distributed.fsdp import register_fsdp_forward_method

        models.shard(model, trained=True, mixed=cfg.precision == "bf16")
        register_fsdp_forward_method(model, "tag_head")
    model.to(device)
    adapter.device = device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    return model, tokenizer, adapter, optimizer, added


def train(cfg: TrainConfig) -> Path:
    rank, world, device = models.init_distributed(cfg.precision)
    cfg.model = local_model(cfg.model, cfg, rank)
    training, held = split_by_problem(read_examples(cfg.labels, cfg.soft_labels), cfg.heldout_fraction, cfg.seed)
    if not training:
        raise SystemExit(f"--heldout-fraction {cfg.heldout_fraction}: nothing is left to train on")
    model, tokenizer, adapter, optimizer, added = prepare_model(cfg, device)
    train_set = ([adapter.encode(e.text, e.ends, i) for i, e in enumerate(training)], [e.targets for e in training])
    held_set = ([adapter.encode(e.text, e.ends, i) for i, e in enumerate(held)], [e.targets for e in held],
                [e.hard for e in held])
    scheduler = models.warmup_then_constant(optimizer, cfg.warmup_steps)
    out = Path(cfg.output_dir)
    metrics_path = out / METRICS_FILE
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")  # the held-out solutions, for `prm.py evaluate --labels`:
        (out / "heldout.jsonl").write_text("".join(json.dumps(e.row) + "\n" for e in held if e.row is not None))
        print(f"prm train: {len(training)} solutions ({sum(len(e.ends) for e in training)} steps) to train on, "
              f"{len(held)} held out; added tokens {added or 'none'}")
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        line = {"epoch": epoch, "train_loss": train_epoch(model, adapter, optimizer, scheduler, train_set, cfg, epoch),
                **held_out_metrics(model, adapter, held_set, cfg), "seconds": time.perf_counter() - start}
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
    folder = out / "prm"
    models.export_hf(model, tokenizer, folder, rank, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    models.barrier()
    if rank == 0:
        check_folder(folder, held or training)
    return folder


def check_folder(folder: Path, examples: list[Example]) -> None:
    """The saved folder must load as `ppo.py --prm` loads it (format step_tag) and score a solution as the
    adapter reads it: one score in [0, 1] per step."""
    prm = models.load_prm(str(folder), {"step_tag": rewards.StepTagPRM, "token_classifier": rewards.TokenClassifierPRM})
    if not isinstance(prm, rewards.StepTagPRM):
        raise SystemExit(f"{folder}: loads as {type(prm).__name__}, not StepTagPRM")
    e = examples[0]
    scores = prm([e.problem], [e.steps])[0]
    if len(scores) != len(e.ends) or not all(0.0 <= s <= 1.0 for s in scores):
        raise SystemExit(f"{folder}: scored {scores} for {len(e.ends)} steps")
    print(f"wrote {folder}: loads with --prm {folder} (step_tag), scores {[round(s, 3) for s in scores]} on a "
          "held-out solution")


# -------------------------------------------------------------------------------------------------
# evaluate: step-level quality, and best-of-N at inference time
# -------------------------------------------------------------------------------------------------


def load_scorer(spec: str):
    """A PRM as `ppo.py --prm` loads it (a folder or hub id, or module:function)."""
    return models.load_prm(spec, {"step_tag": rewards.StepTagPRM, "token_classifier": rewards.TokenClassifierPRM})


def score_in_batches(prm, problems: list[str], steps: list[list[str]], size: int = 64) -> list[list[float]]:
    return [s for i in range(0, len(problems), size) for s in prm(problems[i:i + size], steps[i:i + size])]


def step_quality(prm, cfg: EvaluateConfig) -> list[dict]:
    """Per source of truth (the labels' Monte Carlo hard labels, then each --truth function): the PRM's step AUC
    and accuracy (score >= 0.5 read as good) against it, over every step of the held-out labels."""
    rows = [json.loads(line) for line in Path(cfg.labels).read_text().splitlines() if line.strip()]
    problems, steps = [r["problem"] for r in rows], [r["steps"] for r in rows]
    scores = [s for row in score_in_batches(prm, problems, steps) for s in row]
    truths = {"Monte Carlo labels": [h for r in rows for h in r["hard_labels"]]}
    for spec in (cfg.truth or "").split(","):
        if spec:
            verdicts = score_in_batches(load_scorer(spec), problems, steps)
            truths[spec] = [int(v >= 0.5) for row in verdicts for v in row]
    return [{"truth": name, "steps": len(labels), "good": sum(labels) / len(labels), "auc": auc(scores, labels),
             "accuracy": sum((s >= 0.5) == bool(y) for s, y in zip(scores, labels)) / len(labels)}
            for name, labels in truths.items()]


AGGREGATIONS = {  # a solution's PRM score from its step scores
    "min": min,
    "product": math.prod,
    "last": lambda scores: scores[-1],
}


def best_of_n(prm, cfg: EvaluateConfig, device: torch.device) -> dict:
    """Accuracy on held-out problems of: one random sample (the mean success), majority vote over the N boxed
    answers, the N solutions reranked by each PRM aggregation, and any of N right (pass@N, the ceiling)."""
    seen = {json.loads(line)["problem"] for line in Path(cfg.train_labels).read_text().splitlines()
            if line.strip()} if cfg.train_labels else set()
    problems = [p for p in load_problems(cfg.data, "test", cfg.seed) if p["problem"] not in seen][:cfg.bon_problems]
    sampler = Sampler(local_model(cfg.model, cfg), cfg, device)
    picks: dict[str, list[bool]] = {name: [] for name in ("random sample", "majority vote", *AGGREGATIONS, "pass@N")}
    with rewards.AnswerChecker(cfg.answer_workers, cfg.answer_timeout) as checker:
        for i, problem in enumerate(tqdm(problems, desc="best-of-N")):
            torch.manual_seed(cfg.seed * 1_000_003 + i)
            solutions = sampler(problem["problem"], [""], cfg.bon_samples)[0]
            texts = [text for text, _ in solutions]
            success = [ok and not truncated for ok, (_, truncated) in
                       zip(checker(texts, [problem["answer"]] * len(texts)), solutions)]
            steps = [rewards.split_steps(text, cfg.step_delimiter) for text in texts]
            scores = prm([problem["problem"]] * len(texts), steps)
            picks["random sample"].append(sum(success) / len(success))
            answers = [rewards.extract_boxed(text) for text in texts]
            votes = Counter(a for a in answers if a is not None)
            picks["majority vote"].append(bool(votes) and success[answers.index(votes.most_common(1)[0][0])])
            for name, aggregate in AGGREGATIONS.items():
                value = [aggregate(s) if s else -1.0 for s in scores]  # a step-less solution ranks last
                picks[name].append(success[max(range(len(texts)), key=lambda j: value[j])])
            picks["pass@N"].append(any(success))
    return {"problems": len(problems), "n": cfg.bon_samples,
            "accuracy": {name: sum(map(float, v)) / max(len(v), 1) for name, v in picks.items()}}


def evaluate(cfg: EvaluateConfig) -> dict:
    _, _, device = models.init_distributed("fp32")  # one process: cuda:0 where there is one, else the CPU
    prm = load_scorer(cfg.prm)
    result = {"prm": cfg.prm}
    if cfg.labels:
        result["step_quality"] = step_quality(prm, cfg)
    if cfg.bon_problems:
        result["best_of_n"] = best_of_n(prm, cfg, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prm-eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(evaluation_report(result))
    return result


def evaluation_report(result: dict) -> str:
    lines = [f"PRM {result['prm']}"]
    if "step_quality" in result:
        lines += ["| truth | steps | good | step AUC | step accuracy |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {q['truth']} | {q['steps']} | {q['good']:.2f} | {q['auc']:.3f} | {q['accuracy']:.3f} |"
                  for q in result["step_quality"]]
    if "best_of_n" in result:
        bon = result["best_of_n"]
        lines += [f"best-of-{bon['n']} on {bon['problems']} held-out problems:", "| pick | accuracy |",
                  "| --- | --- |"] + [f"| {name} | {acc:.3f} |" for name, acc in bon["accuracy"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    command, cfg = parse_config(sys.argv[1:] if argv is None else argv)
    {"label": label, "train": train, "evaluate": evaluate}[command](cfg)
    if dist.is_initialized():
        models.end_distributed()


if __name__ == "__main__":
    main()
