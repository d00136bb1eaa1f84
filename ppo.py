"""PPO for LLM math reasoning with process rewards, after "On Designing Effective RL Reward at Training
Time for LLM Reasoning" (Gao et al., arXiv 2410.15115).

What the algorithm really is. Each PPO step:
  1. sample    `samples_per_prompt` responses (a group) for each of `prompts_per_step` math problems;
  2. score     recompute the sampling log-probs (policy), the reference log-probs and, under gae, the
               critic's values; grade the final answers (success reward 1/0) and score every step with a PRM;
  3. rewards   in three parts (rewards.RolloutRewards): the outcome (success + alpha * ORM) on the last
               token, alpha * step rewards from the chosen transform (raw PRM, Clip, Delta, Clip-Delta,
               min-form) on the tokens that end the steps, and a KL penalty -beta * k(logp, logp_ref) per token
               (or, with --kl-in loss, a KL term in the policy loss instead);
  4. advantage per-token advantages by `--advantage` (ESTIMATORS): GAE with a critic (gamma = lambda = 1 by
               default, the value after the last token 0), or critic-free REINFORCE++, RLOO or GRPO over
               each prompt's group, the step rewards kept dense under all four;
  5. whiten    GAE and REINFORCE++ advantages over all valid tokens of the rollout (all ranks);
  6. update    a few epochs of clipped-ratio policy loss (and clipped value loss) over shuffled minibatches,
               per-token losses aggregated by `--loss-agg`.

Where to change one thing (the rest of the code stays the same):
  the estimator           one function here with `@estimator(...)` (see `gae_advantages`)
  the step reward         rewards.STEP_TRANSFORMS (see rewards.py)
  the reward placement    rewards.place_rewards
  the clipped loss        `policy_loss` / `value_loss`;  the aggregation: LOSS_AGGREGATIONS
  the KL form             KL_ESTIMATORS (`--kl-estimator`), where it goes: `--kl-in`
  the sampling            `sample` (and models.generate)

The paper's point is step 3: with raw PRM rewards every extra step pays, so the policy pads its solutions.
Clip (min(score - eta, 0)) makes every step reward <= 0; Delta (score_k - score_{k+1}) telescopes so the
return cannot grow with length. See rewards.py.

Run:
    python ppo.py --preset tiny --reward clip_delta --steps 2          # CPU smoke test, seconds
    python ppo.py --preset toy --reward prm                            # the CPU toy world (toy.py)
    python ppo.py --preset toy --reward clip_delta --advantage grpo    # the same without a critic
    python ppo.py --preset toy-hard --reward clip_delta                # the harder toy world: success is rare
    torchrun --nproc_per_node 8 ppo.py --reward delta                  # the paper's 1.5B run
    python ppo.py --help                                               # every field, with its default
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import data
import eval as evaluation
import models
import rewards
import runlog
import toy
from data import MicroBatch, collate, micro_batches
from models import all_reduce, barrier, response_logprobs, response_values
from cli import arg, config_parser


# A single-process run saves its checkpoint with torch.distributed.checkpoint too; that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Config:
    # --- run ---
    preset: str | None = arg(None, "named defaults: qwen2.5-math-1.5b, qwen2.5-math-7b, tiny, toy, toy-hard; "
                             "explicit flags override")
    output_dir: str = arg("runs/ppo", "everything a run writes: metrics.jsonl, samples.jsonl, checkpoints, the final "
                          "policy")
    steps: int = arg(200, "PPO steps (one rollout and one update each)")
    seed: int = arg(0, "seed for data order (same on all ranks) and sampling (offset by rank)")
    cache_dir: str = arg(str(models.default_cache_dir()), "where locally built models (tiny, toy) are cached")
    # --- models ---
    model: str = arg("Qwen/Qwen2.5-Math-1.5B-Instruct", "policy (and reference) checkpoint: local folder or hub id")
    critic: str | None = arg(None, "critic checkpoint; default: the policy's backbone with a fresh zero-initialised "
                             "value head")
    prm: str = arg("peiyi9979/math-shepherd-mistral-7b-prm", "process reward model: hub id or folder, "
                   "module:function (any callable with the PRM interface), or none")
    prm_revision: str | None = arg(None, "hub revision of --prm (branch, tag or commit); default: main, or the "
                                   "revision models.PINNED_PRM_REVISIONS names (Math-Shepherd: refs/pr/5, its "
                                   "safetensors)")
    prm_format: str = arg("auto", "PRM input format: step_tag (Math-Shepherd), token_classifier (Qwen2.5-Math-PRM), "
                          "or auto: from the PRM's config")
    orm: str = arg("none", "outcome reward model (sequence classifier, sigmoid score) for --reward orm: hub id, "
                   "folder, or none")
    trust_remote_code: bool = arg(False, "allow model code from the hub (Qwen2.5-Math-PRM needs it); never set by a "
                                  "preset")
    precision: str | None = arg(None, "bf16: what a GPU run does (fp32 master weights computing through FSDP2's bf16 "
                                "mixed precision with fp32 gradient reduction, at every world size; frozen models "
                                "in bf16); fp32: everything fp32; default: bf16 on CUDA and for --memory-plan, fp32 "
                                "on CPU")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass of policy and critic (less "
                                       "memory, ~30%% slower)")
    # --- data ---
    train_data: str = arg("mathinstruct", "training problems: named sources (mathinstruct: the paper's, math, gsm8k, "
                          "math500), local .jsonl/.json/.parquet, comma-separated")
    eval_data: str | None = arg(None, "evaluation problems for --eval-every (same syntax as --train-data)")
    eval_every: int = arg(0, "evaluate greedy accuracy every N steps on --eval-size problems of --eval-data (0: never)")
    eval_size: int = arg(128, "how many --eval-data problems (a fixed subset) --eval-every uses")
    problem_field: str = arg("problem", "problem field of local data files")
    answer_field: str = arg("answer", "gold answer field of local data files ('#### N' and \\boxed{} in it are read "
                            "out)")
    skip_bad_rows: bool = arg(False, "skip (and count) data rows without a problem or gold answer instead of failing")
    max_prompt_tokens: int = arg(1024, "prompts longer than this are dropped (and counted) at load time")
    # --- rollout ---
    prompts_per_step: int = arg(64, "problems per PPO step, over all ranks")
    samples_per_prompt: int = arg(8, "responses sampled per problem")
    max_new_tokens: int = arg(1024, "response length limit; a response without EOS by then is truncated (success 0)")
    temperature: float = arg(1.0, "sampling temperature; every policy/reference forward divides logits by it")
    generation_batch_size: int = arg(64, "responses generated at once per rank (bounds the KV cache)")
    # --- reward ---
    reward: str = arg("clip_delta", "reward: success (1/0 on the final answer, the paper's), orm, prm, clip, delta, "
                      "clip_delta, minform (see README)")
    alpha: float = arg(1.0, "weight of the PRM/ORM term against the 1/0 success reward (ours: the paper does not say)")
    eta: float = arg(0.5, "Clip threshold: step reward min(score - eta, 0) (ours: penalise steps the PRM thinks more "
                     "likely wrong than right)")
    minform_temperature: float = arg(0.1, "temperature T of --reward minform's softmin weights on x = 2s - 1 (PURE's "
                                         "transform and its T)")
    step_delimiter: str = arg("\n\n", "text that separates reasoning steps (empty steps are dropped)")
    beta: float = arg(0.1, "KL weight (ReaLHF's default kl_ctl): -beta * k per token in the reward, or beta * k in "
                      "the loss")
    kl_estimator: str = arg("k1", "per-token estimate k of KL(pi || pi_ref) from the sampled token, log r = logp - "
                            "logp_ref")
    kl_in: str = arg("reward", "where the KL goes: reward (-beta * k on every token, seen by every estimator; with "
                     "k1 the policy gradient of the sequence-level KL(pi || pi_ref)) or loss (beta * the --loss-agg of "
                     "k over the update's log-probs, added to the policy loss; no estimator sees it; with k2 the "
                     "gradient of the per-token KL(pi || pi_ref) at the sampled states, with k3 that of the per-token "
                     "KL(pi_ref || pi), neither counting the effect on later tokens; k3 with seq-mean-token-mean is "
                     "DeepSeekMath's GRPO; k1 has zero expected gradient there and is refused)")
    answer_timeout: float = arg(10.0, "seconds before an answer check is killed and counted incorrect")
    answer_workers: int = arg(2, "processes grading answers in parallel")
    # --- PPO ---
    advantage: str = arg("gae", "advantage estimator")
    gamma: float = arg(1.0, "discount (ReaLHF's default)")
    lam: float = arg(1.0, "GAE lambda (ReaLHF's default)")
    clip_eps: float = arg(0.2, "policy ratio clip (ReaLHF's default)")
    value_clip: float = arg(0.2, "value clip around the rollout's values (ReaLHF's default)")
    loss_agg: str = arg("token-mean", "how a minibatch's per-token losses (policy, value, KL) become one number; "
                        "counts over the whole minibatch and all ranks, so micro-batching and the number of ranks do "
                        "not change the gradient")
    ppo_epochs: int = arg(1, "passes over each rollout")
    ppo_minibatches: int = arg(4, "optimiser steps per epoch; the rollout is shuffled and split into this many "
                               "(ReaLHF's default)")
    micro_batch_tokens: int = arg(8192, "token budget of one forward/backward micro-batch (padded tokens counted)")
    policy_lr: float = arg(1e-6, "policy learning rate (ours: common for 1.5B-7B PPO, e.g. OpenRLHF's examples)")
    critic_lr: float = arg(1e-5, "critic learning rate (ours: the fresh value head must move faster than the policy)")
    warmup_steps: int = arg(10, "optimiser steps of linear learning-rate warm-up, then constant")
    max_grad_norm: float = arg(1.0, "gradient clipping, per model")
    # --- logging and checkpoints ---
    log_samples_every: int = arg(10, "write a few completions with their rewards to samples.jsonl every N steps")
    wandb_project: str | None = arg(None, "also log the metrics and the config to this wandb project (rank 0; pip "
                                    "install -e '.[log]'; WANDB_MODE=offline works without network)")
    wandb_entity: str | None = arg(None, "wandb entity (team or user) for --wandb-project; default: your wandb default")
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = arg(2, "how many checkpoints to keep")
    memory_plan: int = arg(0, "instead of training: simulate this run's GPU memory per rank on N ranks, on CPU from "
                           "the models' configs alone; print it and write <output-dir>/memory-plan.json (memory.py)")
    resume: bool = arg(False, "continue from <output-dir>/checkpoints/latest; reads only this run's own folder "
                       "(torch.distributed.checkpoint unpickles its metadata)")


PRESETS: dict[str, dict] = {
    # The paper's models with a public PRM. Math-Shepherd's PRM was trained by the method the paper used.
    "qwen2.5-math-1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B-Instruct", prm="peiyi9979/math-shepherd-mistral-7b-prm",
                              max_new_tokens=1024),
    "qwen2.5-math-7b": dict(model="Qwen/Qwen2.5-Math-7B-Instruct", prm="peiyi9979/math-shepherd-mistral-7b-prm",
                            max_new_tokens=1024, generation_batch_size=32),
    # Tiny random models built locally (models.build_tiny): a smoke test, not for learning.
    "tiny": dict(model="tiny", prm="tiny", orm="tiny", train_data="tiny", eval_data="tiny",
                 prompts_per_step=4, samples_per_prompt=2, max_new_tokens=16, ppo_minibatches=2,
                 micro_batch_tokens=256, gradient_checkpointing=False, steps=4, policy_lr=1e-4, critic_lr=1e-4,
                 warmup_steps=0, log_samples_every=1, output_dir="runs/tiny", max_prompt_tokens=256),
    # The CPU toy worlds (toy.py): a step verifier as PRM, a warm-started character-level policy.
    **toy.PRESETS,
}

# Fields that may change between a checkpoint and its resumed run; any other difference is a config error.
RESUMABLE_FIELDS = {"steps", "resume", "save_every", "keep_checkpoints", "log_samples_every", "eval_every",
                    "wandb_project", "wandb_entity",
                    "eval_size", "eval_data", "answer_workers", "answer_timeout", "cache_dir", "output_dir",
                    "generation_batch_size", "micro_batch_tokens", "gradient_checkpointing", "memory_plan"}
# What a field that a checkpoint predates meant then: the behaviour before the flag existed.
BEFORE_THE_FLAG = {"advantage": "gae", "kl_estimator": "k1", "kl_in": "reward", "loss_agg": "token-mean",
                   "precision": models.default_precision()}


def parse_config(argv: list[str] | None = None) -> Config:
    """One flag per Config field (help = the field's doc, and for a registry's flag its entries); a preset's
    values become the defaults."""
    def summary(function) -> str:  # a docstring's first paragraph, on one line ("" for a lambda)
        return " ".join((function.__doc__ or "").split("\n\n")[0].split())

    def needs(e: Estimator) -> str:
        group = f", --samples-per-prompt >= {e.min_group_size}" if e.min_group_size > 1 else ""
        return ("with a critic" if e.needs_critic else "critic-free") + group

    registries = {"advantage": {name: f"{e.doc}; {needs(e)}" for name, e in ESTIMATORS.items()},
                  "kl_estimator": {name: summary(f) for name, f in KL_ESTIMATORS.items()},
                  "loss_agg": {name: summary(f) for name, f in LOSS_AGGREGATIONS.items()}}
    parser = config_parser(Config, __doc__.split("\n\n")[0], choices=registries)
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        if preset not in PRESETS:
            parser.error(f"--preset: unknown '{preset}'; choose one of {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    # "\n\n" typed on a shell arrives as backslash-n: read the two escapes people type, leave the rest as is.
    args.step_delimiter = args.step_delimiter.replace("\\n", "\n").replace("\\t", "\t")
    if args.prm_revision is None:
        args.prm_revision = models.PINNED_PRM_REVISIONS.get(args.prm)
    # A memory plan sizes GPUs, whatever machine makes it: a GPU run's default precision.
    args.precision = args.precision or ("bf16" if args.memory_plan else models.default_precision())
    return Config(**vars(args))


def validate_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise SystemExit(f"{flag}: unknown '{value}'; choose one of {', '.join(choices)}")


def validate(cfg: Config, world: int) -> None:
    """Fail before any model is loaded, naming the flag. Registries are read now: an entry a fork registered
    later counts too."""
    validate_choice("--reward", cfg.reward, ["success", "orm", *rewards.STEP_TRANSFORMS])
    validate_choice("--advantage", cfg.advantage, ESTIMATORS)
    validate_choice("--kl-estimator", cfg.kl_estimator, KL_ESTIMATORS)
    validate_choice("--kl-in", cfg.kl_in, ("reward", "loss"))
    validate_choice("--loss-agg", cfg.loss_agg, LOSS_AGGREGATIONS)
    validate_choice("--prm-format", cfg.prm_format, ("auto", *models.PRM_FORMATS))
    validate_choice("--precision", cfg.precision, ("bf16", "fp32"))
    if cfg.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--precision bf16: {torch.cuda.get_device_name()} does not support bf16; use --precision "
                         "fp32")
    if cfg.reward in rewards.STEP_TRANSFORMS and cfg.prm == "none":
        raise SystemExit(f"--reward {cfg.reward} needs a process reward model, but --prm is none")
    if cfg.reward == "orm" and cfg.orm == "none":
        raise SystemExit("--reward orm needs --orm (an outcome reward model)")
    if cfg.kl_in == "loss" and cfg.kl_estimator == "k1":
        raise SystemExit("--kl-in loss --kl-estimator k1: k1's gradient in the loss is zero in expectation (it only "
                         "adds noise); use --kl-estimator k2 or k3 in the loss, or k1 with --kl-in reward")
    estimator = ESTIMATORS[cfg.advantage]
    if not estimator.needs_critic and cfg.critic:
        raise SystemExit(f"--critic {cfg.critic}: --advantage {cfg.advantage} is critic-free and would ignore it; "
                         "drop --critic, or use --advantage gae")
    if cfg.samples_per_prompt < estimator.min_group_size:
        raise SystemExit(f"--advantage {cfg.advantage} compares the responses to one prompt: it needs "
                         f"--samples-per-prompt >= {estimator.min_group_size}, got {cfg.samples_per_prompt}")
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} does not divide over {world} ranks")
    per_rank = cfg.prompts_per_step // world * cfg.samples_per_prompt
    if per_rank % cfg.ppo_minibatches:
        raise SystemExit(f"--ppo-minibatches {cfg.ppo_minibatches} does not divide the {per_rank} responses per rank "
                         f"(--prompts-per-step / ranks * --samples-per-prompt)")
    for flag, value in (("--model", cfg.model), ("--critic", cfg.critic), ("--prm", cfg.prm), ("--orm", cfg.orm)):
        if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            raise SystemExit(f"{flag}: no such folder '{value}'")
    if cfg.eval_every and not cfg.eval_data:
        raise SystemExit("--eval-every needs --eval-data")
    if cfg.keep_checkpoints < 1:
        raise SystemExit(f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    if not cfg.resume and (Path(cfg.output_dir) / "checkpoints" / "latest").exists():
        raise SystemExit(f"--output-dir {cfg.output_dir} holds another run's checkpoints: pass --resume to continue "
                         "it, or choose a new --output-dir")
    if cfg.resume:  # the same config (but RESUMABLE_FIELDS) and world size as the checkpoint's
        runlog.check_resumable(cfg, world, RESUMABLE_FIELDS,
                               {**BEFORE_THE_FLAG, "prm_revision": models.PINNED_PRM_REVISIONS.get(cfg.prm)})


# -------------------------------------------------------------------------------------------------
# The math: KL, advantage estimators, losses and their aggregation (log-probs: models.response_logprobs)
# -------------------------------------------------------------------------------------------------


# KL_ESTIMATORS[name](logp, ref_logp) -> per-token estimate of KL(pi || pi_ref), all [n, R]. logp is the log-prob
# of the sampled token under the policy, ref_logp under the reference; log r = logp - ref_logp.


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log r; an unbiased value of KL(pi || pi_ref), can be negative; unclamped

    In the reward its policy gradient is the sequence-level KL(pi || pi_ref)'s; in the loss its expected gradient
    is 0.
        kl_k1(tensor([-1.0]), tensor([-1.5])) -> tensor([0.5])
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(log r)^2 / 2; >= 0, a biased value; in the loss its gradient is the per-token KL(pi || pi_ref)'s; unclamped

        kl_k2(tensor([-1.0]), tensor([-1.5])) -> tensor([0.125])
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(-log r) - 1 + log r; >= 0, an unbiased value; in the loss its gradient is the per-token
    KL(pi_ref || pi)'s (DeepSeekMath's GRPO); log r clamped to +-20 and k3 to <= 10, as verl

    Schulman's estimator. The clamps keep one token the reference finds near impossible from exploding it.
        kl_k3(tensor([-1.0]), tensor([-1.5])) -> exp(-0.5) - 1 + 0.5 = tensor([0.1065])
    """
    log_ratio = (logp - ref_logp).clamp(-20.0, 20.0)
    return (torch.exp(-log_ratio) - 1 + log_ratio).clamp(max=10.0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def compute_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation on the token grid.

    token_rewards, values, mask: [B, T] (mask 1 on response tokens, which start at column 0 and are contiguous).
    Returns (advantages, returns), both [B, T] and 0 off the mask; returns = advantages + values.
    The value after the last response token is 0 whether the response ended with EOS or was truncated (we do
    not bootstrap a truncated response; ReaLHF does).
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    """
    B, T = token_rewards.shape
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros(B, dtype=token_rewards.dtype, device=token_rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # Off the mask both become 0, so the last valid token sees V = 0 and A = 0 after it.
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid tokens of all ranks; 0 off the mask. x, mask: [B, T]."""
    stats = all_reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp_min(0)
    return ((x - mean) * torch.rsqrt(var + eps)).to(x.dtype) * mask


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G[i, t] = sum_{t' >= t} gamma^(t' - t) r[i, t'] over the response; token_rewards, mask [B, T] -> [B, T].

        returns_to_go(tensor([[0., 1., 2., 0.]]), mask=tensor([[1., 1., 1., 0.]]), gamma=1) -> [[3., 3., 2., 0.]]
    """
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def group_ids(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Any group labels [B] -> (indices 0..n-1 [B], n)."""
    unique, index = torch.unique(groups, return_inverse=True)
    return index, len(unique)


def group_normalise(x: torch.Tensor, index: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) over the entries of each group, std the sample std (n - 1); a group with
    fewer than two entries gives 0. x, index [N] (index in 0..n-1) -> [N]."""
    count = x.new_zeros(n).index_add_(0, index, torch.ones_like(x))
    mean = x.new_zeros(n).index_add_(0, index, x) / count.clamp_min(1)
    var = x.new_zeros(n).index_add_(0, index, (x - mean[index]) ** 2) / (count - 1).clamp_min(1)
    normalised = (x - mean[index]) / (var.sqrt()[index] + eps)
    return torch.where(count[index] >= 2, normalised, torch.zeros_like(x))


# The advantage estimators: ESTIMATORS[name](reward, values, mask, groups, cfg) -> (advantages, returns or None).
#   reward   rewards.RolloutRewards: outcome [B], step rewards at their end tokens, kl [B, T], kept apart
#   values   [B, T] critic values, or None without a critic
#   mask     [B, T] 1 on response tokens;  groups [B] each response's prompt (a group never spans ranks)
# Advantages come back [B, T], 0 off the mask; returns are the critic's targets (None: no critic).
# To add an estimator, write one function and register it with `@estimator`: the rest of the code stays the same.


@dataclass(frozen=True)
class Estimator:
    """An entry of ESTIMATORS: the function, and what it needs (read by `validate`, `setup`, `--help`, README)."""

    compute: Callable  # (reward, values, mask, groups, cfg) -> (advantages [B, T], returns [B, T] or None)
    needs_critic: bool  # a critic is loaded, scored, trained and saved only for such an estimator
    min_group_size: int  # the least --samples-per-prompt it works with
    doc: str  # one line for --help

    def __call__(self, reward, values, mask, groups, cfg):
        return self.compute(reward, values, mask, groups, cfg)


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, doc: str, needs_critic: bool = False, min_group_size: int = 1):
    """Register the decorated function as ESTIMATORS[name]."""
    def register(compute):
        ESTIMATORS[name] = Estimator(compute, needs_critic, min_group_size, doc)
        return compute
    return register


@estimator("gae", "GAE, whitened; the paper's", needs_critic=True)
def gae_advantages(reward, values, mask, groups, cfg):
    """GAE with the critic (the paper's): advantages whitened over all valid tokens of all ranks; returns
    A + V are the critic's targets."""
    advantages, returns = compute_gae(reward.on_tokens(mask), values, mask, cfg.gamma, cfg.lam)
    return whiten(advantages, mask), returns


@estimator("grpo", "group-normalised outcome + group-normalised step rewards to go, sample std, eps 1e-6, "
           "not whitened", min_group_size=2)
def grpo_advantages(reward, values, mask, groups, cfg):
    """GRPO (DeepSeekMath, arXiv 2402.03300, 4.1.2 outcome + 4.1.3 process supervision), KL as the reward has it:

        A[i, t] = (R_out[i] - mean_g) / (std_g + eps) + sum_{k: end[i, k] >= t} s~[i, k]
                  - beta * sum_{t' >= t} kl[i, t']
        s~[i, k] = alpha * (u[i, k] - mean) / (std + eps),  mean and std over all steps of the group's responses

    u are the transformed step rewards before alpha (normalising after alpha would cancel it); std is the
    sample std, eps = 1e-6; a group with fewer than two step rewards gets s~ = 0. Not whitened again. The
    step and KL sums are discounted by --gamma (1 by default, as in the paper's formula). With --kl-in loss
    reward.kl is 0 and the KL term is in the loss (with --kl-estimator k3 --loss-agg seq-mean-token-mean, as
    DeepSeekMath has it).
    """
    index, n = group_ids(groups)
    device = index.device
    outcome = group_normalise(reward.outcome.float().to(device), index, n)  # [B]
    lengths = [len(u) for u in reward.steps]
    step_index = index.repeat_interleave(torch.tensor(lengths, dtype=torch.long, device=device))  # [S] groups
    all_steps = torch.cat([u.float().to(device) for u in reward.steps] + [torch.zeros(0, device=device)])  # [S]
    normalised_steps = list((reward.alpha * group_normalise(all_steps, step_index, n)).split(lengths))
    steps = rewards.place_rewards(torch.zeros(len(lengths), device=device), normalised_steps, reward.step_ends, mask)
    to_go = returns_to_go(steps - reward.beta * reward.kl, mask, cfg.gamma)
    return (outcome[:, None] + to_go) * mask, None


@estimator("rloo", "return-to-go minus the mean return of the prompt's other responses, not whitened; late "
           "tokens carry minus the reward before them", min_group_size=2)
def rloo_advantages(reward, values, mask, groups, cfg):
    """RLOO (arXiv 2402.14740), dense: A[i, t] = G[i, t] - mean_{j != i in i's group} R[j], R[j] = G[j, 0].

    The baseline leaves response i out, so it adds no bias, and within a response advantages differ exactly
    by the rewards between tokens (Clip's "every step reward <= 0" and Delta's telescoping survive). Late
    tokens carry minus the reward collected before them. Not whitened (the textbook form; whitening would
    rescale each batch by its spread): `whiten(advantages, mask)` here is the one-line alternative.
    """
    G = returns_to_go(reward.on_tokens(mask), mask, cfg.gamma)
    index, n = group_ids(groups)
    total = G.new_zeros(n).index_add_(0, index, G[:, 0])
    count = G.new_zeros(n).index_add_(0, index, torch.ones_like(G[:, 0]))
    baseline = (total[index] - G[:, 0]) / (count[index] - 1)  # mean of the other responses of the group
    return (G - baseline[:, None]) * mask, None


@estimator("reinforce_pp", "REINFORCE++: the return-to-go, whitened")
def reinforce_pp_advantages(reward, values, mask, groups, cfg):
    """REINFORCE++ (arXiv 2501.03262): A = G, the return-to-go, whitened over all valid tokens of all ranks."""
    return whiten(returns_to_go(reward.on_tokens(mask), mask, cfg.gamma), mask), None


@dataclass
class LossAggregation:
    """How one minibatch's per-token losses [n, R] become the number whose gradient is taken, by `mode`
    (LOSS_AGGREGATIONS). The counts are of the whole minibatch over all micro-batches and ranks, so splitting it
    differently does not change the gradient; a micro-batch's share is computed on its own rows.

        per-token loss  [[1, 1, 1],      mask [[1, 1, 1],     tokens 4, responses 2, max_new_tokens 4
                         [4, 0, 0]]            [1, 0, 0]]
        token-mean               (1 + 1 + 1 + 4) / 4                 = 1.75
        seq-mean-token-mean      (3 / 3 + 4 / 1) / 2                 = 2.5
        seq-mean-token-sum-norm  (3 / 4 + 4 / 4) / 2                 = 0.875
    """

    mode: str
    tokens: float  # valid tokens of the minibatch, all ranks
    responses: float  # responses of the minibatch, all ranks
    max_new_tokens: int  # Dr. GRPO's constant: never a padded width

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return LOSS_AGGREGATIONS[self.mode](per_token * mask, mask, self)


def token_mean(masked: torch.Tensor, mask: torch.Tensor, size: LossAggregation) -> torch.Tensor:
    """DAPO's token-level loss: the sum over all valid tokens / their count (the default)"""
    return masked.sum() / size.tokens


def seq_mean_token_mean(masked: torch.Tensor, mask: torch.Tensor, size: LossAggregation) -> torch.Tensor:
    """the original GRPO's: each response's token mean, averaged over responses"""
    return (masked.sum(-1) / mask.sum(-1).clamp_min(1)).sum() / size.responses


def seq_mean_token_sum_norm(masked: torch.Tensor, mask: torch.Tensor, size: LossAggregation) -> torch.Tensor:
    """Dr. GRPO's: each response's token sum / --max-new-tokens, averaged over responses"""
    return (masked.sum(-1) / size.max_new_tokens).sum() / size.responses


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, LossAggregation], torch.Tensor]] = {
    "token-mean": token_mean, "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm}


def policy_loss(logp, old_logp, advantages, mask, clip_eps: float, aggregate: LossAggregation):
    """Clipped-ratio PPO loss, aggregated over the valid tokens by `aggregate` (see LossAggregation).

    All tensors [n, R]. Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    Returns (loss, number of tokens whose ratio was clipped).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = aggregate(torch.maximum(unclipped, clipped), mask)
    return loss, ((clipped > unclipped).float() * mask).sum().detach()


def value_loss(values, old_values, returns, mask, value_clip: float, aggregate: LossAggregation):
    """Clipped value loss 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2), aggregated as in
    `policy_loss`. All tensors [n, R]."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return aggregate(per_token, mask)


# -------------------------------------------------------------------------------------------------
# What flows between the stages: the rollout (its micro-batches: data.MicroBatch)
# -------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """This rank's share of one PPO step: B = its problems x --samples-per-prompt responses (those of one prompt
    adjacent), R = the longest response. Each stage fills its block of fields. Saved as a plain dict
    (`torch.save(vars(rollout))`), it loads back with `Rollout(**torch.load(path, weights_only=True))`.
    """

    # 1. sample
    problems: list[dict]  # B dataset rows (`problem`, `answer`, ...), one per response
    prompt_ids: list[list[int]]  # B prompts, unpadded
    response_ids: list[list[int]]  # B responses, up to and including the stop token when there is one
    texts: list[str]  # B decoded responses
    mask: torch.Tensor  # [B, R] 1 on response tokens
    truncated: torch.Tensor  # [B] bool: no stop token within --max-new-tokens
    groups: torch.Tensor  # [B] each response's prompt (its index in this rank's batch)
    # 2a. score_tokens: 0 off the mask, at the sampling temperature
    old_logp: torch.Tensor | None = None  # [B, R] the sampling policy's log-probs
    ref_logp: torch.Tensor | None = None  # [B, R] the reference's
    values: torch.Tensor | None = None  # [B, R] the critic's values; None without a critic
    # 2b. grade
    correct: torch.Tensor | None = None  # [B] bool: the boxed answer is right
    success: torch.Tensor | None = None  # [B] 1.0 when correct and not truncated
    step_texts: list[list[str]] | None = None  # B lists of K_b step texts
    step_ends: list[list[int]] | None = None  # B lists of K_b token indices: where each step ends
    step_scores: list[list[float]] | None = None  # B lists of K_b PRM scores in [0, 1] (empty without a PRM)
    orm_scores: torch.Tensor | None = None  # [B] ORM scores (0 without an ORM)
    # 3-5. train_on_rollout keeps what it makes, for samples.jsonl and tests
    step_rewards: list[torch.Tensor] | None = None  # B tensors [K_b]: alpha * transformed step scores
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R] the critic's targets; None without a critic
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # time/rollout, time/score


def equalise(chunks: list[list[int]]) -> list[tuple[list[int], float]]:
    """Every rank must run the same number of forward passes under FSDP: pad the list of micro-batches with
    repeats of the first that count with weight 0. Returns [(row indices, weight)]."""
    n = int(all_reduce(torch.tensor([len(chunks)]), op=dist.ReduceOp.MAX).item())
    return [(rows, 1.0) for rows in chunks] + [(chunks[0], 0.0)] * (n - len(chunks))


# -------------------------------------------------------------------------------------------------
# The PPO step: 1-2 `rollout` (`sample`, `score_tokens`, `grade`), 3-5 `train_on_rollout` (rewards, advantages),
# 6 `update`, then `runlog.step_metrics`
# -------------------------------------------------------------------------------------------------


def rollout(cfg: Config, batch: list[dict], run: models.Run) -> Rollout:
    """Stages 1 and 2 for this rank's problems: sample responses, then score their tokens and grade them."""
    t0 = time.perf_counter()
    ro = sample(cfg, batch, run)
    t1 = time.perf_counter()
    score_tokens(cfg, ro, run)
    grade(cfg, ro, run)
    ro.seconds = {"time/rollout": t1 - t0, "time/score": time.perf_counter() - t1}
    return ro


def sample(cfg: Config, batch: list[dict], run: models.Run) -> Rollout:
    """1. samples_per_prompt responses per problem, sampled with explicit settings, from weights all-gathered
    once (FSDP2) rather than once per generated token. Rows of one problem are adjacent: B = len(batch) * n."""
    problems = [p for p in batch for _ in range(cfg.samples_per_prompt)]
    prompt_ids = [p["prompt_ids"] for p in problems]
    run.policy.eval()
    response_ids: list[list[int]] = []
    with models.gathered(run.policy):
        for start in range(0, len(prompt_ids), cfg.generation_batch_size):
            response_ids += models.generate(run.policy, prompt_ids[start:start + cfg.generation_batch_size],
                                            pad_id=run.tokenizer.pad_token_id, stop_ids=run.stop_ids,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    R = max(max(len(r) for r in response_ids), 1)
    lengths = torch.tensor([len(r) for r in response_ids])
    return Rollout(problems=problems, prompt_ids=prompt_ids, response_ids=response_ids,
                   texts=run.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
                   mask=(torch.arange(R)[None, :] < lengths[:, None]).float(),  # [B, R]
                   truncated=torch.tensor([not r or r[-1] not in run.stop_ids for r in response_ids]),  # [B]
                   groups=torch.arange(len(batch)).repeat_interleave(cfg.samples_per_prompt))  # [B]


@torch.no_grad()
def score_tokens(cfg: Config, ro: Rollout, run: models.Run) -> None:
    """2a. Log-probs of the sampling policy and of the reference (both at the sampling temperature) and, under
    an estimator with a critic, the critic's values: `old_logp`, `ref_logp`, `values` [B, R], 0 off the mask."""
    B, R = ro.mask.shape
    scorers = {"old_logp": run.policy, "ref_logp": run.reference, "values": run.critic}
    scorers = {field: model for field, model in scorers.items() if model is not None}
    out = {field: torch.zeros(B, R) for field in scorers}
    lengths = [len(r) for r in ro.response_ids]
    chunks = micro_batches(list(range(B)), [len(p) for p in ro.prompt_ids], lengths, cfg.micro_batch_tokens)
    for rows, _ in equalise(chunks):
        mb = collate(ro, rows, run.tokenizer.pad_token_id, run.device)
        width = mb.response_ids.shape[1]
        for field, model in scorers.items():
            scores = (response_values(model, mb) if field == "values"
                      else response_logprobs(model, mb, cfg.temperature))
            out[field][rows, :width] = scores.float().cpu()
    for model in scorers.values():  # FSDP2 roots keep their parameters gathered after a forward: free them
        models.reshard(model)
    for field, scores in out.items():
        setattr(ro, field, scores * ro.mask)


def grade(cfg: Config, ro: Rollout, run: models.Run) -> None:
    """2b. Answers (`correct`, `success` [B]: a truncated response never succeeds), steps and their end tokens,
    PRM step scores (lists of K_b) and ORM scores (`orm_scores` [B], 0 without an ORM)."""
    questions = [p["problem"] for p in ro.problems]
    ro.correct = torch.tensor(run.checker(ro.texts, [p["answer"] for p in ro.problems]))
    ro.success = (ro.correct & ~ro.truncated).float()
    ro.step_texts = [rewards.split_steps(t, cfg.step_delimiter) for t in ro.texts]
    ro.step_ends = [rewards.step_end_indices(r, run.tokenizer, cfg.step_delimiter) for r in ro.response_ids]
    # A sharded PRM/ORM is gathered once for the whole batch: its forwards then need no collectives, so ranks
    # may run different numbers of them (the adapters skip responses without steps).
    ro.step_scores = [[] for _ in questions]
    if run.prm is not None:
        with models.gathered(getattr(run.prm, "model", None)):
            ro.step_scores = run.prm(questions, ro.step_texts)
    ro.orm_scores = torch.zeros(len(questions))
    if run.orm is not None:
        with models.gathered(getattr(run.orm, "model", None)):
            ro.orm_scores = torch.tensor(run.orm(questions, ro.texts))


def train_on_rollout(cfg: Config, step: int, ro: Rollout, run: models.Run) -> dict[str, float]:
    """Stages 3 to 6 on a scored rollout (this rank's share); returns the step's metrics (all ranks).

    What the stages make is kept in `ro` (`step_rewards`, `advantages`, `returns`) for samples.jsonl and tests.
    """
    t0 = time.perf_counter()
    # 3. Rewards in three parts: outcome (success + alpha * ORM), alpha * step rewards at the tokens that end
    #    the steps, KL per token (zero here when --kl-in loss puts it in the loss instead).
    kl = KL_ESTIMATORS[cfg.kl_estimator](ro.old_logp, ro.ref_logp) * ro.mask if cfg.kl_in == "reward" else None
    reward = rewards.RolloutRewards.of_rollout(ro, cfg, kl=torch.zeros_like(ro.mask) if kl is None else kl)
    # 4-5. Advantages (and the critic's targets) by --advantage; each estimator whitens, or not, as it should.
    ro.advantages, ro.returns = ESTIMATORS[cfg.advantage](reward, ro.values, ro.mask, ro.groups, cfg)
    ro.step_rewards = reward.step_rewards
    # 6. Update the policy (and critic).
    sums = update(cfg, step, ro, run)
    return runlog.step_metrics(cfg, ro, reward, sums, run, update_time=time.perf_counter() - t0)


def update(cfg: Config, step: int, ro: Rollout, run: models.Run) -> runlog.UpdateSums:
    """6. ppo_epochs passes over shuffled minibatches, one optimiser step per minibatch.

    Losses are aggregated with the minibatch's counts over all micro-batches and ranks (LossAggregation), and
    multiplied by the world size because FSDP2 averages gradients over ranks: the gradient is then independent
    of both.
    """
    for model, _ in run.trained().values():
        model.train()
    B = ro.mask.shape[0]
    prompt_lens, response_lens = [len(p) for p in ro.prompt_ids], [len(r) for r in ro.response_ids]
    sums = runlog.UpdateSums()
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + run.rank)
    minibatch_size = B // cfg.ppo_minibatches
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=shuffle).tolist()
        for m in range(cfg.ppo_minibatches):
            rows = order[m * minibatch_size:(m + 1) * minibatch_size]
            aggregate = LossAggregation(cfg.loss_agg, tokens=all_reduce(ro.mask[rows].sum()).item(),
                                        responses=minibatch_size * run.world, max_new_tokens=cfg.max_new_tokens)
            for chunk, weight in equalise(micro_batches(rows, prompt_lens, response_lens, cfg.micro_batch_tokens)):
                mb = collate(ro, chunk, run.tokenizer.pad_token_id, run.device)
                backward_micro_batch(cfg, step, mb, weight, aggregate, run, sums)
            optimizer_step(cfg, run, sums)
    return sums


def backward_micro_batch(cfg: Config, step: int, mb: MicroBatch, weight: float, aggregate: LossAggregation,
                         run: models.Run, sums: runlog.UpdateSums) -> None:
    """Policy forward and backward (with the KL term under --kl-in loss), then the critic's: only one activation
    graph is alive at a time. `weight` 0 marks a repeat that only keeps the ranks' collectives in step (see
    `equalise`)."""
    logp, entropy = response_logprobs(run.policy, mb, cfg.temperature, with_entropy=True)  # [n, R]
    p_loss, clipped = policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, cfg.clip_eps, aggregate)
    kl_loss = torch.zeros(())
    if cfg.kl_in == "loss":  # beta * KL to the reference, of the log-probs being trained; exactly 0 off the mask
        kl_loss = cfg.beta * aggregate(KL_ESTIMATORS[cfg.kl_estimator](
            torch.where(mb.mask.bool(), logp, mb.ref_logp), mb.ref_logp), mb.mask)
    p_loss_total = p_loss + kl_loss if cfg.kl_in == "loss" else p_loss
    (p_loss_total * weight * run.world).backward()
    v_loss = torch.zeros(())
    if run.critic is not None:
        new_values = response_values(run.critic, mb)  # [n, R]
        v_loss = value_loss(new_values, mb.values, mb.returns, mb.mask, cfg.value_clip, aggregate)
        (v_loss * weight * run.world).backward()
    # Every rank must stop together, or the others wait forever in the next collective.
    if all_reduce(torch.tensor([float(not (torch.isfinite(p_loss_total) and torch.isfinite(v_loss)))])).item():
        raise RuntimeError(f"step {step}: non-finite loss on some rank (here: policy {p_loss_total.item()}, value "
                           f"{v_loss.item()}); stopping, the last checkpoint in {cfg.output_dir}/checkpoints is kept")
    if weight == 0:
        return
    with torch.no_grad():
        log_ratio = (logp - mb.old_logp) * mb.mask
        if sums.first_ratio_error is None:
            sums.first_ratio_error = log_ratio.abs().max().item()
        sums.policy_loss += p_loss.item()
        sums.value_loss += v_loss.item()
        sums.kl_loss += kl_loss.item()
        sums.clipped += clipped.item()
        sums.approx_kl += ((log_ratio.exp() - 1 - log_ratio) * mb.mask).sum().item()  # k3 of KL(old||new)
        sums.ratio += (log_ratio.exp() * mb.mask).sum().item()
        sums.entropy += (entropy * mb.mask).sum().item()
        sums.tokens += mb.mask.sum().item()


def optimizer_step(cfg: Config, run: models.Run, sums: runlog.UpdateSums) -> None:
    """Clip each model's gradient to max_grad_norm, step its optimiser and schedule, clear its gradient."""
    for name, (model, (optimizer, scheduler)) in run.trained().items():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if name == "policy":
            sums.policy_grad_norm += norm / run.world  # the same global norm on every rank: count it once
        else:
            sums.value_grad_norm += norm / run.world
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sums.optimizer_steps += 1 / run.world


# -------------------------------------------------------------------------------------------------
# Setup: local models, data, and what a run holds (models.load_run)
# -------------------------------------------------------------------------------------------------


def resolve_local_models(cfg: Config, rank: int) -> None:
    """The `tiny`, `toy` and `toy-hard` presets name models that are built here (rank 0 first; later ranks reuse
    them)."""
    for turn in range(2):
        if (turn == 0) == (rank == 0):
            if cfg.model == "tiny":
                paths = models.build_tiny(Path(cfg.cache_dir) / "tiny")
                cfg.model = str(paths["policy"])
                if cfg.prm == "tiny":
                    classifier = cfg.prm_format == "token_classifier"
                    cfg.prm = str(paths["token_classifier_prm" if classifier else "step_tag_prm"])
                if cfg.orm == "tiny":
                    cfg.orm = str(paths["orm"])
            elif cfg.model in toy.WORLDS:
                cfg.model = str(toy.warm_start(Path(cfg.cache_dir) / "toy", cfg.seed, **toy.WORLDS[cfg.model]))
        barrier()


def load_problems(source: str, split: str, cfg: Config) -> list[dict]:
    """--train-data / --eval-data rows; a bad source or row ends in one line naming the flag."""
    if source == "tiny":
        return data.tiny_problems(seed=cfg.seed if split == "train" else cfg.seed + 1)
    if source in toy.WORLDS:
        world = toy.WORLDS[source]
        return toy.problems(5000 if split == "train" else 200, cfg.seed, split, world["min_ops"], world["max_ops"])
    try:
        return data.load_problems(source, split, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                                  skip_bad_rows=cfg.skip_bad_rows)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: a hub dataset out of reach
        raise SystemExit(f"{'--train-data' if split == 'train' else '--eval-data'}: {err}") from err


def setup(cfg: Config, rank: int, world: int, device: torch.device) -> models.Run:
    """Load (and on several ranks shard) what this run uses and make the optimisers: a critic only for an
    estimator that needs one, a PRM only for a step reward, an ORM only for --reward orm."""
    uses_prm = cfg.reward in rewards.STEP_TRANSFORMS and cfg.prm != "none"
    return models.load_run(cfg, rank, world, device, with_critic=ESTIMATORS[cfg.advantage].needs_critic,
                           prm_adapters={"step_tag": rewards.StepTagPRM, "token_classifier": rewards.TokenClassifierPRM}
                           if uses_prm else None, orm_adapter=rewards.SequenceORM if cfg.reward == "orm" else None)


# -------------------------------------------------------------------------------------------------
# main: setup, then one rollout and one update per step, with logs, evaluation and checkpoints
# -------------------------------------------------------------------------------------------------


def prepare(cfg: Config, rank: int, world: int, device: torch.device):
    """Everything before the first step: the run folder, local models, data (before models: a bad source or row
    fails first), the models, seeds, the prompt sampler, and a resumed checkpoint. Returns (run, sampler,
    eval problems, the last step done, the config as given)."""
    requested = dataclasses.asdict(cfg)  # as given, before local models resolve to paths: what --resume compares
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_local_models(cfg, rank)
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    train_rows = load_problems(cfg.train_data, "train", cfg)
    eval_problems = load_problems(cfg.eval_data, "test", cfg)[:cfg.eval_size] if cfg.eval_every else None
    run = setup(cfg, rank, world, device)
    torch.manual_seed(cfg.seed + rank)  # per-rank sampling seed, set after loading; the data order has its own
    random.seed(cfg.seed + rank)
    problems, dropped = data.tokenize_prompts(run.tokenizer, train_rows, cfg.max_prompt_tokens)
    if rank == 0 and dropped:
        print(f"--train-data: dropped {dropped} prompts longer than --max-prompt-tokens {cfg.max_prompt_tokens}",
              file=sys.stderr)
    sampler = data.PromptSampler(problems, cfg.prompts_per_step, seed=cfg.seed)
    start = 0
    if cfg.resume:
        start = runlog.load_checkpoint(run_dir, run.trained(), run.rank, sampler)
        for _, scheduler in run.optimizers.values():  # the schedule is a function of the optimiser step count
            scheduler.last_epoch = start * cfg.ppo_epochs * cfg.ppo_minibatches - 1
            scheduler.step()
    return run, sampler, eval_problems, start, requested


def plan_memory(cfg: Config) -> None:
    """--memory-plan N: the run's per-rank memory in each phase, simulated (memory.py); nothing is trained."""
    import memory

    resolve_local_models(cfg, rank=0)
    plan = memory.plan(cfg, cfg.memory_plan, with_critic=ESTIMATORS[cfg.advantage].needs_critic,
                       uses_prm=cfg.reward in rewards.STEP_TRANSFORMS and cfg.prm != "none",
                       uses_orm=cfg.reward == "orm")
    print(memory.report(plan, cfg, cfg.memory_plan))
    print(f"wrote {memory.write(plan, cfg.output_dir)}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.memory_plan:
        return plan_memory(cfg)
    rank, world, device = models.init_distributed(cfg.precision)
    validate(cfg, world)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    run, sampler, eval_problems, start, requested = prepare(cfg, rank, world, device)
    run_dir, per_rank = Path(cfg.output_dir), cfg.prompts_per_step // world
    log = runlog.RunLog(run_dir, rank == 0, start, cfg)
    with rewards.AnswerChecker(cfg.answer_workers, cfg.answer_timeout) as checker, contextlib.closing(log):
        run.checker = checker
        bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0, desc="ppo")
        for step in bar:
            ro = rollout(cfg, sampler.next_batch()[rank * per_rank:(rank + 1) * per_rank], run)
            metrics = train_on_rollout(cfg, step, ro, run)
            if cfg.eval_every and step % cfg.eval_every == 0:
                run.policy.eval()
                with models.gathered(run.policy):
                    result = evaluation.evaluate(run.policy, run.tokenizer, eval_problems, checker=checker,
                                                 max_new_tokens=cfg.max_new_tokens,
                                                 batch_size=cfg.generation_batch_size)
                metrics["eval/accuracy"] = float(result["accuracy"])
            log.metrics(step, metrics)
            if cfg.log_samples_every and step % cfg.log_samples_every == 0:
                log.samples(step, runlog.sample_rows(ro))
            bar.set_postfix(success=f"{metrics['reward/success']:.2f}", len=f"{metrics['response/length']:.0f}",
                            steps=f"{metrics['response/steps']:.1f}", kl=f"{metrics['policy/ref_kl']:.3f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                runlog.save_checkpoint(run_dir, run.trained(), run.rank, step=step, keep=cfg.keep_checkpoints,
                                state={"sampler": sampler.state_dict(), "config": requested})
    for name, (model, _) in run.trained().items():  # the critic only with an estimator that has one
        models.export_hf(model, run.tokenizer, run_dir / name, rank,
                         dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    if rank == 0:
        print(f"done: metrics in {run_dir / 'metrics.jsonl'}, policy in {run_dir / 'policy'}", file=sys.stderr)


if __name__ == "__main__":
    main()
    models.end_distributed()  # under torchrun: end the rank safely (see its docstring); alone: nothing
