"""What a PPO run records: the metrics of each step, its logs, and sharded checkpoints to resume from.

- `step_metrics`: the step's metrics in named groups (reward/, response/, loss/, policy/, value/, time/, ...),
  from named sums over the rollout and the update, reduced over ranks in one all-reduce; `sample_rows` picks
  a few completions for samples.jsonl.

- `save_checkpoint` / `load_checkpoint` / `latest_checkpoint`: checkpoints under <output-dir>/checkpoints/step_N, written with
  torch.distributed.checkpoint (every rank its shard), with an atomic `latest` pointer and the last few kept.
  A checkpoint holds the trained models (policy, and the critic when the estimator has one) with their
  optimisers, every rank's RNG states, and a state.json (step, world size, and what the caller adds: the data
  position and the config). torch.distributed.checkpoint unpickles its own metadata, so only a run's own folder
  is ever read back (`--resume`); weights from outside are safetensors.
- `RunLog`: metrics.jsonl (one line per step), samples.jsonl, TensorBoard when installed, and wandb with
  --wandb-project; rank 0 writes, a resumed run continues the files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import os
import random
import secrets
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from models import all_reduce, barrier, world_size


# -------------------------------------------------------------------------------------------------
# Metrics of a step
# -------------------------------------------------------------------------------------------------


@dataclass
class UpdateSums:
    """Sums over this rank's valid tokens and optimiser steps during ppo.update; reduced over ranks for metrics."""

    policy_loss: float = 0.0
    value_loss: float = 0.0
    kl_loss: float = 0.0
    clipped: float = 0.0
    approx_kl: float = 0.0
    ratio: float = 0.0
    entropy: float = 0.0
    tokens: float = 0.0
    policy_grad_norm: float = 0.0
    value_grad_norm: float = 0.0
    optimizer_steps: float = 0.0
    # max |log ratio| of this rank's first micro-batch, not reduced: ~0 when scoring and training agree
    first_ratio_error: float | None = None


@dataclass
class RolloutSums:
    """Sums over this rank's responses for the step's metrics; reduced over ranks with the UpdateSums."""

    responses: float
    prompt_tokens: float
    success: float
    correct: float
    process: float  # alpha-scaled step rewards
    outcome: float  # alpha * ORM scores
    kl: float  # logp - logp_ref summed over tokens (k1: the same quantity whatever --kl-estimator says)
    reward_kl: float  # the --kl-estimator's KL where it is paid as reward (0 under --kl-in loss)
    length: float  # response tokens
    steps: float
    truncated: float
    groups: float
    equal_groups: float  # groups whose outcome rewards are all equal
    # under an estimator with a critic: returns - values over the valid tokens
    error: float = 0.0
    error_sq: float = 0.0
    returns: float = 0.0
    returns_sq: float = 0.0
    values: float = 0.0


def equal_outcome_groups(outcome: torch.Tensor, groups: torch.Tensor) -> int:
    """How many groups have all outcome rewards equal (zero outcome advantage under grpo and rloo).
    outcome, groups [B] (any group labels)."""
    _, index = torch.unique(groups, return_inverse=True)
    n = int(index.max()) + 1 if len(index) else 0
    low = torch.full((n,), float("inf")).scatter_reduce(0, index, outcome.float(), "amin")
    high = torch.full((n,), -float("inf")).scatter_reduce(0, index, outcome.float(), "amax")
    return int((low == high).sum())


def rollout_sums(ro, reward) -> RolloutSums:
    """This rank's RolloutSums of a trained ppo.Rollout and its rewards.RolloutRewards."""
    sums = RolloutSums(
        responses=ro.mask.shape[0], prompt_tokens=sum(len(p) for p in ro.prompt_ids), success=ro.success.sum(),
        correct=ro.correct.sum(), process=sum(r.sum() for r in reward.step_rewards),
        outcome=(reward.outcome - ro.success).sum(), kl=((ro.old_logp - ro.ref_logp) * ro.mask).sum(), reward_kl=reward.kl.sum(), length=ro.mask.sum(),
        steps=sum(len(s) for s in ro.step_texts), truncated=ro.truncated.sum(), groups=len(torch.unique(ro.groups)),
        equal_groups=equal_outcome_groups(reward.outcome, ro.groups))
    if ro.returns is not None:
        valid = ro.mask.bool()
        error = (ro.returns - ro.values)[valid]
        sums.error, sums.error_sq = error.sum(), (error ** 2).sum()
        sums.returns, sums.returns_sq = ro.returns[valid].sum(), (ro.returns[valid] ** 2).sum()
        sums.values = ro.values[valid].sum()
    return sums


def summed_over_ranks(*parts):
    """Copies of dataclasses of numbers with every field summed over ranks, in one all-reduce (fp64)."""
    names = [[f.name for f in dataclasses.fields(p) if f.name != "first_ratio_error"] for p in parts]
    local = torch.tensor([float(getattr(p, n)) for p, fields in zip(parts, names) for n in fields], dtype=torch.float64)
    totals = iter(all_reduce(local).tolist())
    return [dataclasses.replace(p, **{n: next(totals) for n in fields}) for p, fields in zip(parts, names)]


def step_metrics(cfg, ro, reward, sums, run, update_time: float) -> dict[str, float]:
    """The step's metrics in named groups (the README's glossary): this rank's sums of the rollout (RolloutSums)
    and of the update (UpdateSums), one reduction over ranks, then ratios. cfg: ppo.Config, ro: ppo.Rollout,
    reward: rewards.RolloutRewards, run: models.Run."""
    r, u = summed_over_ranks(rollout_sums(ro, reward), sums)
    n, steps = r.responses, u.optimizer_steps
    rollout_time = ro.seconds["time/rollout"] + ro.seconds["time/score"]
    metrics = {
        "reward/success": r.success / n, "reward/correct_answer": r.correct / n,
        "reward/process": r.process / n, "reward/outcome_model": r.outcome / n,
        "reward/kl": -cfg.beta * r.reward_kl / n,
        "reward/total": (r.success + r.process + r.outcome - cfg.beta * r.reward_kl) / n,
        "response/length": r.length / n, "response/steps": r.steps / n, "response/truncated": r.truncated / n,
        "advantage/equal_outcome_groups": r.equal_groups / r.groups,
        "loss/policy": u.policy_loss / steps,
        "policy/clip_frac": u.clipped / u.tokens, "policy/approx_kl": u.approx_kl / u.tokens,
        "policy/ratio": u.ratio / u.tokens, "policy/entropy": u.entropy / u.tokens,
        "policy/ref_kl": r.kl / n, "policy/first_ratio_error": sums.first_ratio_error,
        "policy/grad_norm": u.policy_grad_norm / steps,
        "answer/timeouts": getattr(run.checker, "timeouts", 0),
        **ro.seconds, "time/update": update_time, "time/step": rollout_time + update_time,
        "throughput/tokens_per_s": (r.length + r.prompt_tokens) / (rollout_time + update_time),
        "throughput/generated_tokens_per_s": r.length / max(ro.seconds["time/rollout"], 1e-9),
    }
    if cfg.kl_in == "loss":
        metrics["loss/kl"] = u.kl_loss / steps
    if ro.returns is not None:
        def variance(total: float, squares: float) -> float:  # over the valid tokens of all ranks
            return squares / r.length - (total / r.length) ** 2

        metrics.update({"loss/value": u.value_loss / steps, "value/grad_norm": u.value_grad_norm / steps,
                        "value/explained_var": 1 - variance(r.error, r.error_sq)
                        / max(variance(r.returns, r.returns_sq), 1e-12),
                        "value/mean": r.values / r.length})
    if run.device.type == "cuda":  # this rank's peak since the run started
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return {k: float(v) for k, v in metrics.items()}


def sample_rows(ro, k: int = 4) -> list[dict]:
    """The first k completions of this rank with their rewards, for samples.jsonl."""
    return [dict(problem=ro.problems[i]["problem"], answer=ro.problems[i]["answer"], response=ro.texts[i],
                 success=float(ro.success[i]), truncated=bool(ro.truncated[i]),
                 step_scores=[float(s) for s in ro.step_scores[i]], step_rewards=ro.step_rewards[i].tolist())
            for i in range(min(k, len(ro.texts)))]


# -------------------------------------------------------------------------------------------------
# Checkpoints
# -------------------------------------------------------------------------------------------------


def _trained_state(trained: dict) -> dict:
    """{"policy": ..., "policy_opt": ...} and the same for the critic if any: what a checkpoint holds.
    `trained` maps a name to (model, (optimiser, schedule))."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (model, (optimizer, _)) in trained.items():
        state[name], state[f"{name}_opt"] = get_state_dict(model, optimizer)
    return state


def save_checkpoint(run_dir: Path, trained: dict, rank: int, *, step: int, keep: int, state: dict) -> None:
    """Sharded checkpoint under <run_dir>/checkpoints/step_N, then an atomic `latest` pointer.

    Written into step_N.tmp and renamed when complete, so a kill mid-save leaves the previous one usable.
    `state` (JSON) is stored in state.json beside the step and the world size.
    """
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_trained_state(trained), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    rng = {"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]), dtype=torch.long)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size(), **state}, indent=1))
        latest_pointer = root / "latest"
        if final.exists() and not (latest_pointer.exists() and latest_pointer.read_text().strip() == final.name):
            shutil.rmtree(final)  # left by a kill between the rename and the pointer update: never pointed to
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, latest_pointer)
        complete = [d for d in root.glob("step_*") if not d.name.endswith(".tmp")]
        for old in sorted(complete, key=lambda d: int(d.name.removeprefix("step_")))[:-keep]:
            shutil.rmtree(old)
    barrier()


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """(folder, state.json) of <run_dir>/checkpoints/latest."""
    root = run_dir / "checkpoints"
    if not (root / "latest").is_file():
        raise SystemExit(f"--resume: no checkpoint in {root} (no 'latest' file)")
    folder = root / (root / "latest").read_text().strip()
    return folder, json.loads((folder / "state.json").read_text())


def check_resumable(cfg, world: int, resumable: set[str], before_the_flag: dict) -> None:
    """A checkpoint continues only the configuration (as given on the command line) and world size it came from.
    `resumable` fields may change; a field the checkpoint predates reads as `before_the_flag` says."""
    folder, state = latest_checkpoint(Path(cfg.output_dir))
    saved, current = {**before_the_flag, **state["config"]}, dataclasses.asdict(cfg)
    diff = [k for k in current if k not in resumable and saved.get(k) != current[k]]
    if diff:
        raise SystemExit(f"--resume: checkpoint {folder} was written with a different config: " +
                         ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {current[k]!r})" for k in diff))
    if state["world_size"] != world:
        raise SystemExit(f"--resume: {folder} was saved by {state['world_size']} ranks, this run has {world}: "
                         "resume under the same number of ranks (the RNG state and the data slices are per rank)")


def load_checkpoint(run_dir: Path, trained: dict, rank: int, sampler) -> int:
    """Restore everything `save_checkpoint` wrote from <run_dir>/checkpoints/latest into `trained`, this rank's RNG states
    and `sampler` (from state["sampler"]); returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder, state = latest_checkpoint(run_dir)
    sd = _trained_state(trained)
    dcp.load(sd, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    for name, (model, (optimizer, _)) in trained.items():
        set_state_dict(model, optimizer, model_state_dict=sd[name], optim_state_dict=sd[f"{name}_opt"])
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"].tolist()), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


# -------------------------------------------------------------------------------------------------
# Logs: metrics.jsonl, samples.jsonl, TensorBoard, wandb
# -------------------------------------------------------------------------------------------------


class RunLog:
    """metrics.jsonl (one line per step), samples.jsonl, TensorBoard when installed, wandb with
    --wandb-project; rank 0 only."""

    def __init__(self, run: Path, enabled: bool, resumed_step: int, cfg):
        self.enabled, self.run = enabled, run
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = run / name
            if path.exists():  # a resumed run continues the file; steps after the checkpoint are redone
                kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resumed_step]
                path.write_text("".join(l + "\n" for l in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            pass
        if cfg.wandb_project:
            self.wandb = start_wandb(run, cfg)

    def metrics(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        if self.enabled:
            with open(self.run / "samples.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path, cfg):
    """A wandb run named after the output folder, with the config; a resumed run continues the same wandb run
    (its id is kept in <output-dir>/wandb-run-id)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit(f"--wandb-project {cfg.wandb_project}: wandb is not installed; pip install -e '.[log]'") from None
    id_file = run_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if cfg.resume and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    wandb_run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_dir.name, id=run_id,
                           resume="allow", dir=str(run_dir))
    wandb_run.config.update(dataclasses.asdict(cfg), allow_val_change=True)  # resumable fields may change
    return wandb_run
