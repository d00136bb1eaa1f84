"""Accuracy of a policy on math problems, measured the way the paper reports it.

    python eval.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --data math500              # greedy accuracy
    python eval.py --model runs/ppo/policy --data math --samples 16 --temperature 1    # sampled: mean@16, pass@k
    torchrun --nproc_per_node 8 eval.py --model runs/ppo/policy --data math           # data-parallel, same results

- Greedy accuracy (`--temperature 0`, the default): one response per problem; the fraction whose last
  \\boxed{} answer matches the gold answer (rewards.AnswerChecker, math-verify in worker processes).
- Sampling (`--samples N --temperature T`): `accuracy` is the mean over all N x problems responses (the
  paper's "sampling" column), and `pass@k` for k = 1, 2, 4, ..., N is the unbiased estimator of Chen et al.
  (2021): the chance that at least one of k responses, drawn without replacement from the N, is correct.
- Accuracy by subject and by level where the data has them. The paper's MATH numbers are on the full
  5000-problem test set (`--data math`); `math500` is the quick default.

Writes `<output-dir>/results.json` (the numbers and the config) and `<output-dir>/responses.jsonl` (one line
per problem: its responses, extracted answers and verdicts).

Prompts are batched longest first. The sorted list of batches is the same for any number of ranks and
batch b goes to rank b % world_size, sampling with seed + b; so a 2-rank run gives the same per-problem
results as a 1-rank run (greedy and sampled), and rank 0 gathers them in problem order.

ppo.py calls `evaluate` every `--eval-every` steps on a fixed subset, on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import data
import models
import rewards
from cli import arg, config_parser


@dataclass
class EvalConfig:
    model: str = arg("Qwen/Qwen2.5-Math-1.5B-Instruct", "policy to evaluate: local folder (e.g. runs/ppo/policy) or hub id")
    data: str = arg("math500", "problems: math500 (quick), math (the full 5000-problem test set, as the paper), gsm8k, local .jsonl/.json/.parquet files; comma-separated to mix")
    split: str = arg("test", "split of the named sources (local files are one split)")
    problem_field: str = arg("problem", "problem field of local files")
    answer_field: str = arg("answer", "gold answer field of local files ('#### N' and \\boxed{} in it are read out)")
    skip_bad_rows: bool = arg(False, "skip (and count) rows without a problem or gold answer instead of failing")
    limit: int | None = arg(None, "evaluate only the first N problems")
    samples: int = arg(1, "responses per problem; more than 1 needs --temperature > 0 and adds pass@k")
    temperature: float = arg(0.0, "0: greedy decoding; > 0: sampling at this temperature (top-k, top-p and repetition penalty off)")
    max_new_tokens: int = arg(2048, "response length limit; a response without EOS by then counts as truncated")
    batch_size: int = arg(64, "responses generated at once on each rank")
    seed: int = arg(0, "sampling seed; batch b samples with seed + b, so results do not depend on the number of ranks")
    answer_workers: int = arg(2, "processes grading answers in parallel (per rank)")
    answer_timeout: float = arg(10.0, "seconds before an answer check is killed and counted incorrect")
    output_dir: str = arg("runs/eval", "where results.json and responses.jsonl go")
    trust_remote_code: bool = arg(False, "allow model code from the hub")


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    parser = config_parser(EvalConfig, __doc__.split("\n\n")[0])
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    if cfg.samples < 1:
        parser.error(f"--samples must be >= 1, got {cfg.samples}")
    if cfg.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {cfg.temperature}")
    if cfg.samples > 1 and cfg.temperature == 0:
        parser.error(f"--samples {cfg.samples} with --temperature 0 would repeat one greedy response; pass --temperature > 0")
    for flag, value in (("--limit", cfg.limit), ("--batch-size", cfg.batch_size), ("--max-new-tokens", cfg.max_new_tokens)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if cfg.model.startswith((".", "/", "~")) and not Path(cfg.model).expanduser().exists():
        parser.error(f"--model: no such folder '{cfg.model}'")
    return cfg


# -------------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n responses of which c are correct: 1 - C(n-c, k) / C(n, k).

    The ratio of binomials is computed as the product prod_{i=n-c+1}^{n} (1 - k / i), which never forms the
    huge binomials. Example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct response
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself: pass_ks(6) == [1, 2, 4, 6]."""
    ks = [2 ** e for e in range(n.bit_length()) if 2 ** e <= n]
    return ks + ([n] if ks[-1] != n else [])


def summarize(records: list[dict]) -> dict:
    """The numbers of an evaluation from its per-problem records.

    Each record has `correct` (one bool per response; the same count for every problem), `truncated` and
    `response_tokens` (one entry per response), and optionally `subject` and `level`. Accuracy is the mean
    over all responses (greedy: over problems); pass@k (only with several samples) is averaged over problems.
    """
    if not records:
        raise ValueError("summarize: no records")
    n = len(records[0]["correct"])
    if any(len(r["correct"]) != n for r in records):
        raise ValueError("summarize: every problem needs the same number of responses")

    def accuracy(rs):
        return sum(sum(r["correct"]) for r in rs) / (n * len(rs))

    out = {"num_problems": len(records), "samples": n, "accuracy": accuracy(records)}
    if n > 1:
        for k in pass_ks(n):
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in records) / len(records)
    out["truncated"] = sum(sum(r["truncated"]) for r in records) / (n * len(records))
    out["response_tokens"] = sum(sum(r["response_tokens"]) for r in records) / (n * len(records))
    for key in ("subject", "level"):
        groups: dict[str, list[dict]] = {}
        for r in records:
            if key in r:
                groups.setdefault(str(r[key]), []).append(r)
        if groups:
            # Levels 1..5 in numeric order, then any non-numeric level ("?"); subjects alphabetically.
            order = sorted(groups, key=lambda name: (0, int(name), "") if name.isdigit() else (1, 0, name))
            out[f"by_{key}"] = {name: {"num_problems": len(groups[name]), "accuracy": accuracy(groups[name])}
                                for name in order}
    return out


# -------------------------------------------------------------------------------------------------
# Generation and grading
# -------------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    problems: list[dict],
    *,
    checker,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 1024,
    batch_size: int = 32,
    seed: int = 0,
    generate_fn=None,
    progress: bool = False,
) -> dict:
    """Generate `samples` responses per problem, grade them, and summarise (see `summarize`).

    problems: rows of data.load_problems (`problem`, `answer`, optional `subject` / `level`). temperature 0
    means greedy. `checker` is a rewards.AnswerChecker. `generate_fn` replaces models.generate (same
    signature), e.g. for a sharded model; by default the model is used as it is.

    Under torch.distributed, call it on every rank with the same problems: each rank generates its share of
    the batches and every rank gets the full result. Every rank calls `generate_fn` the same number of times
    (a rank without a batch left repeats one and discards it), since a sharded generate is a collective.
    The caller's RNG state is restored afterwards (sampling is seeded per batch).

    Returns the summary dict (`accuracy`, ...) plus `records`: one dict per problem, in input order, with
    `index`, `problem`, `answer`, `responses`, `extracted` (last \\boxed{} or None), `correct`, `truncated`
    and `response_tokens` (one entry per response), and `source` / `subject` / `level` where present.
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    if samples > 1 and temperature == 0:
        raise ValueError(f"evaluate: {samples} greedy samples would all be the same response; use temperature > 0")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    prompts, _ = data.tokenize_prompts(tokenizer, problems)
    stop_ids = models.stop_token_ids(model, tokenizer)
    batches = _batches_longest_first(prompts, samples, batch_size)
    local = _generate_rank_share(model, tokenizer, prompts, batches, generate_fn or models.generate,
                                 stop_ids=stop_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed, rank=rank, world=world, progress=progress)
    graded, timeouts = _grade(local, prompts, tokenizer, checker, stop_ids)
    graded, timeouts = _gather_over_ranks(graded, timeouts, world)
    records = _problem_records(prompts, samples, graded)
    return {**summarize(records), "answer_timeouts": timeouts, "records": records}


def _batches_longest_first(prompts: list[dict], samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Every (problem index, sample index) pair, in batches of `batch_size`, longest prompt first.

    Similar lengths share a batch (little padding) and a batch that does not fit in memory fails at once. The
    order depends on nothing but the prompts, so batch b is the same batch for any number of ranks.
    """
    items = sorted(((i, s) for i in range(len(prompts)) for s in range(samples)),
                   key=lambda item: -len(prompts[item[0]]["prompt_ids"]))
    return [items[start:start + batch_size] for start in range(0, len(items), batch_size)]


def _generate_rank_share(model, tokenizer, prompts, batches, generate_fn, *, stop_ids, max_new_tokens, temperature,
                         seed, rank, world, progress) -> list[tuple[int, int, list[int]]]:
    """(problem index, sample index, response ids) for this rank's batches: b = rank, rank + world, ...

    Every rank runs the same number of rounds (a rank past the last batch repeats it and discards the result),
    batch b samples with seed + b, and the caller's RNG state is restored afterwards.
    """
    device = next(model.parameters()).device
    local = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in tqdm(range(math.ceil(len(batches) / world)), desc="eval", disable=not progress or rank != 0):
            b = r * world + rank
            batch = batches[min(b, len(batches) - 1)]
            torch.manual_seed(seed + b)
            responses = generate_fn(model, [prompts[i]["prompt_ids"] for i, _ in batch], pad_id=tokenizer.pad_token_id,
                                    stop_ids=stop_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                    greedy=temperature == 0)
            if b < len(batches):
                local.extend((i, s, ids) for (i, s), ids in zip(batch, responses))
    return local


def _grade(local, prompts: list[dict], tokenizer, checker, stop_ids) -> tuple[list[tuple], int]:
    """This rank's graded rows and the answer checks that timed out on them.

    One row per response of `local`: (problem index, sample index, text, extracted answer, correct, truncated,
    response tokens). A response is truncated when it does not end with a stop token.
    """
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for _, _, ids in local]
    timeouts_before = checker.timeouts
    verdicts = checker(texts, [prompts[i]["answer"] for i, _, _ in local]) if local else []
    stop = set(stop_ids)
    graded = [(i, s, text, rewards.extract_boxed(text), bool(ok), not ids or ids[-1] not in stop, len(ids))
              for (i, s, ids), text, ok in zip(local, texts, verdicts)]
    return graded, checker.timeouts - timeouts_before


def _gather_over_ranks(graded: list[tuple], timeouts: int, world: int) -> tuple[list[tuple], int]:
    """Every rank's graded rows and the total answer-check timeouts, on every rank (as they are for one rank)."""
    if world == 1:
        return graded, timeouts
    shards = [None] * world
    dist.all_gather_object(shards, (graded, timeouts))
    return [row for shard, _ in shards for row in shard], sum(t for _, t in shards)


def _problem_records(prompts: list[dict], samples: int, graded: list[tuple]) -> list[dict]:
    """One record per problem, in problem order, with its `samples` graded responses in sample order."""
    records = []
    for i, p in enumerate(prompts):
        record = {"index": i, **{k: p[k] for k in ("source", "subject", "level") if k in p},
                  "problem": p["problem"], "answer": p["answer"]}
        for key in ("responses", "extracted", "correct", "truncated", "response_tokens"):
            record[key] = [None] * samples
        records.append(record)
    for i, s, text, extracted, ok, truncated, n_tokens in graded:
        r = records[i]
        r["responses"][s], r["extracted"][s], r["correct"][s] = text, extracted, ok
        r["truncated"][s], r["response_tokens"][s] = truncated, n_tokens
    return records


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


def report(result: dict, cfg: EvalConfig) -> str:
    """The summary as a few lines of text."""
    mode = "greedy" if cfg.temperature == 0 else f"{result['samples']} samples at temperature {cfg.temperature}"
    lines = [f"{cfg.model} on {cfg.data} ({cfg.split}): {result['num_problems']} problems, {mode}",
             f"  accuracy   {100 * result['accuracy']:6.2f}%"]
    lines += [f"  {key:10s} {100 * value:6.2f}%" for key, value in result.items() if key.startswith("pass@")]
    lines.append(f"  truncated  {100 * result['truncated']:6.2f}%   mean response {result['response_tokens']:.0f} tokens"
                 f"   answer-check timeouts {result['answer_timeouts']}")
    for key in ("by_subject", "by_level"):
        for name, group in result.get(key, {}).items():
            lines.append(f"  {key[3:]:7s} {name:24s} {100 * group['accuracy']:6.2f}%  ({group['num_problems']} problems)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    rank, _, device = models.init_distributed()
    try:
        problems = data.load_problems(cfg.data, cfg.split, problem_field=cfg.problem_field,
                                      answer_field=cfg.answer_field, skip_bad_rows=cfg.skip_bad_rows)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        raise SystemExit(f"--data {cfg.data}: {err}") from err
    skipped = problems.skipped
    problems = problems[:cfg.limit]
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = models.load_model(cfg.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              device=device, trust_remote_code=cfg.trust_remote_code).eval()
    with rewards.AnswerChecker(cfg.answer_workers, cfg.answer_timeout) as checker:
        result = evaluate(model, tokenizer, problems, checker=checker, samples=cfg.samples,
                          temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size, seed=cfg.seed, progress=True)
    records = result.pop("records")
    result["skipped_rows"] = skipped
    if rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**result, "config": dataclasses.asdict(cfg)}, indent=1) + "\n")
        with (out / "responses.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(report(result, cfg))
        print(f"wrote {out / 'results.json'} and {out / 'responses.jsonl'}")
    return result


if __name__ == "__main__":
    main()
    models.end_distributed()  # under torchrun: end the rank safely (see its docstring); alone: nothing
