"""
The ablation table (and plot) of PPO runs, and a timing of one PPO step's scoring and update.

A script on top of ppo.py; nothing imports it. `table` reads each run's config.json and metrics.jsonl and puts
the seeds of one experiment (the same config.json but the seed and the output folder) on one row: start -> end
means of the first and the last 10 PPO steps, the spread of the end success over the seeds, the mean success
over all steps, the first step whose 10-step mean success reaches a threshold, and a verdict against the
`success` run of the same configuration. With `--out`, the table is written there and, with matplotlib
installed, its plot beside it (same name, .png). `bench` times `ppo.score_tokens` and `ppo.train_on_rollout` on one
saved toy rollout, so that advantage estimators are compared on the same responses.

Table of runs (printed, or written with its plot):
python report.py table runs/toy-prm runs/toy-clip_delta runs/toy-grpo
python report.py table runs/toy-ablation/* --out runs/toy-ablation/report.md --threshold 0.8

Median seconds of scoring and the update of one toy rollout (sampled and saved on the first call):
python report.py bench --advantage grpo --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import models
import ppo
import rewards
import toy

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
        for field, value in ppo.BEFORE_THE_FLAG.items():  # runs that predate --advantage, --kl-in, ...
            config.setdefault(field, value)
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


def variant(config: dict) -> str:
    """What a run changed of the KL and the loss, e.g. " (kl_in loss, kl_estimator k3)"; "" for the defaults."""
    changed = [f"{k} {config[k]}" for k, v in ppo.BEFORE_THE_FLAG.items() if k != "advantage" and config.get(k, v) != v]
    return f" ({', '.join(changed)})" if changed else ""


def table_row(group: RunGroup, reference: RunGroup | None, threshold: float) -> list[str]:
    config = group.config
    alpha = "-" if config["reward"] == "success" else f"{config['alpha']:g}"
    minutes = sum(sum(r.get("time/step", 0.0) for r in rows) for rows in group.runs) / len(group.runs) / 60
    cells = [group.name, str(config["reward"]), alpha, config["advantage"] + variant(config),
             ", ".join(map(str, group.seeds)),
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
    if importlib.util.find_spec("matplotlib") is None:
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
            label = str(group.config["reward"]) + variant(group.config)
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
    """Median seconds of `ppo.score_tokens` and `ppo.train_on_rollout` (rewards, advantages, update, metrics) over
    `repeats` passes on one toy rollout (preset toy, clip_delta): the phases that a critic adds to.

    The rollout (sampled responses and their grades, no scores) is sampled with seed 0 and saved to
    `rollout_path` the first time, so every estimator is timed on the same responses.
    """
    cfg = ppo.parse_config(["--preset", "toy", "--reward", "clip_delta", "--advantage", advantage,
                            "--cache-dir", str(cache_dir), "--output-dir", tempfile.mkdtemp(prefix="toy-bench-")])
    ppo.validate(cfg, world=1)
    ppo.resolve_local_models(cfg, rank=0)
    run = ppo.setup(cfg, 0, 1, torch.device("cpu"))
    if not rollout_path.is_file():
        with rewards.AnswerChecker(1, cfg.answer_timeout) as checker:
            run.checker = checker
            prompts, _ = data.tokenize_prompts(run.tokenizer, toy.problems(cfg.prompts_per_step, seed=0), 64)
            torch.manual_seed(0)
            ro = ppo.rollout(cfg, prompts, run)
        rollout_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in vars(ro).items() if k not in ("seconds", "old_logp", "ref_logp", "values")},
                   rollout_path)
    saved = torch.load(rollout_path, weights_only=True)
    if set(saved) - {f.name for f in dataclasses.fields(ppo.Rollout)}:
        raise SystemExit(f"--rollout {rollout_path}: saved by an older version (keys {sorted(saved)}); delete it and "
                         "it is sampled again")
    times: dict[str, list[float]] = {"score": [], "update": []}
    for _ in range(repeats):
        ro = ppo.Rollout(**saved, seconds={"time/rollout": 0.0, "time/score": 0.0})
        start = time.perf_counter()
        ppo.score_tokens(cfg, ro, run)
        scored = time.perf_counter()
        ppo.train_on_rollout(cfg, 1, ro, run)
        times["score"].append(scored - start)
        times["update"].append(time.perf_counter() - scored)
    return {phase: sorted(t)[len(t) // 2] for phase, t in times.items()}


def rss_mib() -> dict[str, float]:
    """This process's resident memory now, MiB (Linux, /proc/self/status): `rss` in all, `anon` of it not backed
    by a file (a memory-mapped safetensors file counts in `rss` only: the kernel can drop those pages)."""
    status = Path("/proc/self/status").read_text()
    kib = {key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) for key in ("VmRSS", "RssAnon")}
    return {"rss": kib["VmRSS"] / 1024, "anon": kib["RssAnon"] / 1024}


def setup_memory(folder: Path, precision: str) -> dict[str, float]:
    """Peak resident memory of this rank while `ppo.setup` loads a run's models (policy, critic, reference),
    sampled every 5 ms, against its memory just before; run under torchrun. The model in `folder` is a Qwen2 of
    ~100M parameters with random weights, written by rank 0 when missing."""
    rank, world, device = models.init_distributed(precision)
    if rank == 0 and not (folder / "config.json").is_file():
        from transformers import Qwen2ForCausalLM

        config = models.tiny_qwen2_config(32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                          num_attention_heads=12, num_key_value_heads=4)
        Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        models.build_tiny_tokenizer().save_pretrained(folder)
    models.barrier()
    cfg = ppo.parse_config(["--model", str(folder), "--prm", "none", "--reward", "success", "--precision", precision,
                            "--prompts-per-step", str(world), "--no-gradient-checkpointing"])
    before, done = rss_mib(), threading.Event()
    peak = dict(before)

    def sample() -> None:
        while not done.wait(0.005):
            peak.update({key: max(peak[key], value) for key, value in rss_mib().items()})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = ppo.setup(cfg, rank, world, device)
    done.set()
    sampler.join()
    size = sum(p.numel() for p in run.policy.parameters())  # a sharded DTensor counts its global size
    after = rss_mib()
    return {"rank": rank, "world": world, "precision": precision, "policy_mib_fp32": size * 4 / 2**20,
            **{f"{key}_{when}_mib": value[key] for when, value in (("before", before), ("peak", peak), ("after", after))
               for key in ("rss", "anon")}}


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.strip().split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="markdown table (and PNG plot) of PPO runs' metrics.jsonl")
    table.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    table.add_argument("--out", type=Path, default=None,
                       help="write the table here and the plot beside it (same name, .png); default: print the table")
    table.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="success rate of the sample-efficiency column: the first step whose "
                       f"{REPORT_WINDOW}-step mean reaches it (default {DEFAULT_THRESHOLD})")
    timing = commands.add_parser("bench", help="median seconds of scoring and the update of one saved toy rollout")
    timing.add_argument("--advantage", default="gae", help="the --advantage to time (default gae)")
    timing.add_argument("--rollout", type=Path, default=Path("runs/toy-bench/rollout.pt"),
                        help="the saved rollout; sampled (seed 0) and saved here when missing")
    timing.add_argument("--repeats", type=int, default=10, help="passes over the rollout; the median is printed")
    timing.add_argument("--cache-dir", type=Path, default=models.default_cache_dir())
    memory = commands.add_parser("setup-memory", help="peak resident memory of a rank while ppo.setup loads a "
                                 "~100M-parameter run (run it under torchrun)")
    memory.add_argument("--model-dir", type=Path, default=Path("runs/setup-memory-model"))
    memory.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    args = parser.parse_args(argv)

    if args.command == "setup-memory":
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                          for k, v in setup_memory(args.model_dir, args.precision).items()}), flush=True)
        models.end_distributed()
        return
    if args.command == "bench":
        seconds = bench(args.advantage, args.rollout, args.repeats, args.cache_dir)
        print(json.dumps({"advantage": args.advantage, **{f"seconds/{k}": round(v, 4) for k, v in seconds.items()}}))
        return
    text = report(args.run_dirs, args.out, args.threshold)
    print(text if args.out is None else f"wrote {args.out}", end="" if args.out is None else "\n")


if __name__ == "__main__":
    main()
