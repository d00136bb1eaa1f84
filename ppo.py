"""PPO for LLM math reasoning with process rewards, after "On Designing Effective RL Reward at Training
Time for LLM Reasoning" (Gao et al., arXiv 2410.15115).

What the algorithm really is. Each PPO step:
  1. sample    `samples_per_prompt` responses (a group) for each of `prompts_per_step` math problems;
  2. score     recompute the sampling log-probs (policy), the reference log-probs and, under gae, the
               critic's values; grade the final answers (success reward 1/0) and score every step with a PRM;
  3. rewards   in three parts (rewards.RolloutRewards): the outcome (success + alpha * ORM) on the last
               token, alpha * step rewards from the chosen transform (raw PRM, Clip, Delta, Clip-Delta,
               min-form) on the tokens that end the steps, and a KL penalty -beta * (logp - logp_ref) per token;
  4. advantage per-token advantages by `--advantage` (ESTIMATORS): GAE with a critic (gamma = lambda = 1 by
               default, the value after the last token 0), or critic-free REINFORCE++, RLOO or GRPO over
               each prompt's group, the step rewards kept dense under all four;
  5. whiten    GAE and REINFORCE++ advantages over all valid tokens of the rollout (all ranks);
  6. update    a few epochs of clipped-ratio policy loss (and clipped value loss) over shuffled minibatches.

To change the estimator, write one function beside `gae_advantages` and add it to ESTIMATORS.

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
import importlib
import json
import os
import random
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import eval as evaluation
import models
import rewards
from eval import arg


# A single-process run saves its checkpoint with torch.distributed.checkpoint too; that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Config:
    # --- run ---
    preset: str | None = arg(None, "named defaults: qwen2.5-math-1.5b, qwen2.5-math-7b, tiny, toy, toy-hard; explicit flags override")
    output_dir: str = arg("runs/ppo", "everything a run writes: metrics.jsonl, samples.jsonl, checkpoints, the final policy")
    steps: int = arg(200, "PPO steps (one rollout and one update each)")
    seed: int = arg(0, "seed for data order (same on all ranks) and sampling (offset by rank)")
    cache_dir: str = arg(str(models.default_cache_dir()), "where locally built models (tiny, toy) are cached")
    # --- models ---
    model: str = arg("Qwen/Qwen2.5-Math-1.5B-Instruct", "policy (and reference) checkpoint: local folder or hub id")
    critic: str | None = arg(None, "critic checkpoint; default: the policy's backbone with a fresh zero-initialised value head")
    prm: str = arg("peiyi9979/math-shepherd-mistral-7b-prm", "process reward model: hub id or folder, module:function (any callable with the PRM interface), or none")
    prm_revision: str | None = arg(None, "hub revision of --prm (branch, tag or commit); default: main, or the revision PINNED_PRM_REVISIONS names (Math-Shepherd: refs/pr/5, its safetensors)")
    prm_format: str = arg("auto", "PRM input format: step_tag (Math-Shepherd), token_classifier (Qwen2.5-Math-PRM), or auto: from the PRM's config")
    orm: str = arg("none", "outcome reward model (sequence classifier, sigmoid score) for --reward orm: hub id, folder, or none")
    trust_remote_code: bool = arg(False, "allow model code from the hub (Qwen2.5-Math-PRM needs it); never set by a preset")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass of policy and critic (less memory, ~30%% slower)")
    # --- data ---
    train_data: str = arg("mathinstruct", "training problems: named sources (mathinstruct: the paper's, math, gsm8k, math500), local .jsonl/.json/.parquet, comma-separated")
    eval_data: str | None = arg(None, "evaluation problems for --eval-every (same syntax as --train-data)")
    eval_every: int = arg(0, "evaluate greedy accuracy every N steps on --eval-size problems of --eval-data (0: never)")
    eval_size: int = arg(128, "how many --eval-data problems (a fixed subset) --eval-every uses")
    problem_field: str = arg("problem", "problem field of local data files")
    answer_field: str = arg("answer", "gold answer field of local data files ('#### N' and \\boxed{} in it are read out)")
    skip_bad_rows: bool = arg(False, "skip (and count) data rows without a problem or gold answer instead of failing")
    max_prompt_tokens: int = arg(1024, "prompts longer than this are dropped (and counted) at load time")
    # --- rollout ---
    prompts_per_step: int = arg(64, "problems per PPO step, over all ranks")
    samples_per_prompt: int = arg(8, "responses sampled per problem")
    max_new_tokens: int = arg(1024, "response length limit; a response without EOS by then is truncated (success 0)")
    temperature: float = arg(1.0, "sampling temperature; every policy/reference forward divides logits by it")
    generation_batch_size: int = arg(64, "responses generated at once per rank (bounds the KV cache)")
    # --- reward ---
    reward: str = arg("clip_delta", "reward: success (1/0 on the final answer, the paper's), orm, prm, clip, delta, clip_delta, minform (see README)")
    alpha: float = arg(1.0, "weight of the PRM/ORM term against the 1/0 success reward (ours: the paper does not say)")
    eta: float = arg(0.5, "Clip threshold: step reward min(score - eta, 0) (ours: penalise steps the PRM thinks more likely wrong than right)")
    minform_temperature: float = arg(0.1, "temperature of PURE's softmin weights for --reward minform (PURE's value)")
    step_delimiter: str = arg("\n\n", "text that separates reasoning steps (empty steps are dropped)")
    beta: float = arg(0.1, "KL penalty per token, -beta * (logp - logp_ref), in the reward (ReaLHF's default kl_ctl)")
    answer_timeout: float = arg(10.0, "seconds before an answer check is killed and counted incorrect")
    answer_workers: int = arg(2, "processes grading answers in parallel")
    # --- PPO ---
    advantage: str = arg("gae", "advantage estimator: gae (GAE with a critic, whitened; the paper's); critic-free: reinforce_pp (return-to-go, whitened), rloo (return-to-go minus the mean return of the prompt's other responses, not whitened; late tokens carry minus the reward before them), grpo (group-normalised outcome + group-normalised step rewards to go, sample std, eps 1e-6, not whitened); rloo and grpo need --samples-per-prompt >= 2")
    gamma: float = arg(1.0, "discount (ReaLHF's default)")
    lam: float = arg(1.0, "GAE lambda (ReaLHF's default)")
    clip_eps: float = arg(0.2, "policy ratio clip (ReaLHF's default)")
    value_clip: float = arg(0.2, "value clip around the rollout's values (ReaLHF's default)")
    ppo_epochs: int = arg(1, "passes over each rollout")
    ppo_minibatches: int = arg(4, "optimiser steps per epoch; the rollout is shuffled and split into this many (ReaLHF's default)")
    micro_batch_tokens: int = arg(8192, "token budget of one forward/backward micro-batch (padded tokens counted)")
    policy_lr: float = arg(1e-6, "policy learning rate (ours: common for 1.5B-7B PPO, e.g. OpenRLHF's examples)")
    critic_lr: float = arg(1e-5, "critic learning rate (ours: the fresh value head must move faster than the policy)")
    warmup_steps: int = arg(10, "optimiser steps of linear learning-rate warm-up, then constant")
    max_grad_norm: float = arg(1.0, "gradient clipping, per model")
    # --- logging and checkpoints ---
    log_samples_every: int = arg(10, "write a few completions with their rewards to samples.jsonl every N steps")
    wandb_project: str | None = arg(None, "also log the metrics and the config to this wandb project (rank 0; pip install -e '.[log]'; WANDB_MODE=offline works without network)")
    wandb_entity: str | None = arg(None, "wandb entity (team or user) for --wandb-project; default: your wandb default")
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = arg(2, "how many checkpoints to keep")
    resume: bool = arg(False, "continue from <output-dir>/checkpoints/latest; reads only this run's own folder (torch.distributed.checkpoint unpickles its metadata)")


PRESETS: dict[str, dict] = {
    # The paper's models with a public PRM. Math-Shepherd's PRM was trained by the method the paper used.
    "qwen2.5-math-1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B-Instruct", prm="peiyi9979/math-shepherd-mistral-7b-prm",
                              max_new_tokens=1024),
    "qwen2.5-math-7b": dict(model="Qwen/Qwen2.5-Math-7B-Instruct", prm="peiyi9979/math-shepherd-mistral-7b-prm",
                            max_new_tokens=1024, generation_batch_size=32),
    # Tiny random models built locally (models.build_tiny): a smoke test, not for learning.
    "tiny": dict(model="tiny", prm="tiny", orm="tiny", train_data="tiny", eval_data="tiny",
                 prompts_per_step=4, samples_per_prompt=2, max_new_tokens=16, ppo_minibatches=2,
                 micro_batch_tokens=256, gradient_checkpointing=False, steps=4, policy_lr=1e-4, critic_lr=1e-4, warmup_steps=0,
                 log_samples_every=1, output_dir="runs/tiny", max_prompt_tokens=256),
    # The CPU toy world (toy.py): a step verifier as PRM, a warm-started character-level policy.
    "toy": dict(model="toy", prm="toy:step_verifier", train_data="toy", eval_data="toy", prompts_per_step=16,
                samples_per_prompt=4, max_new_tokens=64, temperature=1.0, ppo_epochs=2, ppo_minibatches=2,
                policy_lr=3e-5, critic_lr=1e-4, warmup_steps=0, beta=0.02, alpha=1.0, eta=0.5, steps=120,
                micro_batch_tokens=4096, gradient_checkpointing=False, log_samples_every=10, output_dir="runs/toy", max_prompt_tokens=64),
}
# The harder toy world: 4-6 operations per problem and a warm start that succeeds about 0.3 of the time when
# sampling (toy.HARD_CONFIG), so that the success reward alone is rare and dense step credit can matter.
PRESETS["toy-hard"] = dict(PRESETS["toy"], model="toy-hard", train_data="toy-hard", eval_data="toy-hard",
                           max_new_tokens=128, output_dir="runs/toy-hard")

# (good, bad, tag) token ids of the Math-Shepherd PRM as its model card reads them: a guard against a tokenizer
# that loads differently (the scores would be silently wrong).
MATH_SHEPHERD_IDS = {"peiyi9979/math-shepherd-mistral-7b-prm": (648, 387, 12902)}

# Hub PRMs whose main branch has pickled weights only: the revision holding the hub's safetensors conversion,
# used when --prm-revision is not given (and then written to config.json).
PINNED_PRM_REVISIONS = {"peiyi9979/math-shepherd-mistral-7b-prm": "refs/pr/5"}

# Fields that may change between a checkpoint and its resumed run; any other difference is a config error.
RESUMABLE_FIELDS = {"steps", "resume", "save_every", "keep_checkpoints", "log_samples_every", "eval_every",
                    "wandb_project", "wandb_entity",
                    "eval_size", "eval_data", "answer_workers", "answer_timeout", "cache_dir", "output_dir",
                    "generation_batch_size", "micro_batch_tokens", "gradient_checkpointing"}


def parse_config(argv: list[str] | None = None) -> Config:
    """One flag per Config field (help = the field's doc); a preset's values become the defaults."""
    parser = evaluation.config_parser(Config, __doc__.split("\n\n")[0])
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        if preset not in PRESETS:
            parser.error(f"--preset: unknown '{preset}'; choose one of {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    # "\n\n" typed on a shell arrives as backslash-n: read the two escapes people type, leave the rest as is.
    args.step_delimiter = args.step_delimiter.replace("\\n", "\n").replace("\\t", "\t")
    if args.prm_revision is None:
        args.prm_revision = PINNED_PRM_REVISIONS.get(args.prm)
    return Config(**vars(args))


def validate(cfg: Config, world: int) -> None:
    """Fail before any model is loaded, naming the flag."""
    choices = ["success", "orm", *rewards.STEP_TRANSFORMS]  # read now: a transform registered later counts too
    if cfg.reward not in choices:
        raise SystemExit(f"--reward: unknown '{cfg.reward}'; choose one of {', '.join(choices)}")
    if cfg.reward in rewards.STEP_TRANSFORMS and cfg.prm == "none":
        raise SystemExit(f"--reward {cfg.reward} needs a process reward model, but --prm is none")
    if cfg.reward == "orm" and cfg.orm == "none":
        raise SystemExit("--reward orm needs --orm (an outcome reward model)")
    if cfg.advantage not in ESTIMATORS:
        raise SystemExit(f"--advantage: unknown '{cfg.advantage}'; choose one of {', '.join(ESTIMATORS)}")
    if cfg.advantage not in NEEDS_CRITIC and cfg.critic:
        raise SystemExit(f"--critic {cfg.critic}: --advantage {cfg.advantage} is critic-free and would ignore it; "
                         "drop --critic, or use --advantage gae")
    if cfg.advantage in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
        raise SystemExit(f"--advantage {cfg.advantage} compares the responses to one prompt: it needs "
                         f"--samples-per-prompt >= 2, got {cfg.samples_per_prompt}")
    if cfg.prm_format not in ("auto", "step_tag", "token_classifier"):
        raise SystemExit(f"--prm-format: unknown '{cfg.prm_format}'; choose auto, step_tag or token_classifier")
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
    if cfg.resume:
        check_resumable(cfg, world)


# -------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)
# -------------------------------------------------------------------------------------------------


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks, on the device the backend needs (NCCL: the GPU); returns x's device."""
    if not dist.is_initialized():
        return x
    y = x.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_reduce_max(n: int) -> int:
    return int(all_reduce(torch.tensor([n]), op=dist.ReduceOp.MAX).item())


# -------------------------------------------------------------------------------------------------
# The math: log-probs, GAE, losses
# -------------------------------------------------------------------------------------------------


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_rows: int = 1024):
    """log softmax(logits / T)[target] in fp32, `chunk_rows` rows at a time.

    logits [N, V] (any dtype), targets [N] -> [N] fp32. With a 152k vocabulary an fp32 copy of all logits
    would be the largest tensor of the step; each chunk is cast, reduced and (under autograd) recomputed in
    the backward pass instead of being kept.
    """
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = (logits[start:start + chunk_rows], targets[start:start + chunk_rows], temperature)
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *chunk, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*chunk))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row, fp32, chunked: logits [N, V] -> [N]. For logging only."""
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        logp = F.log_softmax(logits[start:start + chunk_rows].float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def response_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Log-probs of the response tokens under `model`, temperature-scaled: -> [n, R] (and entropy [n, R]).

    The batch is laid out [left-padded prompt (P columns) | right-padded response (R columns)]. Logits at
    position t predict token t+1, so response token i is scored by the logits at column P-1+i, i.e. columns
    P-1 .. P+R-2. Example, P=3, R=2:
        columns   0    1    2    3    4
        tokens    pad  q1   q2   a1   a2
        logits at column 2 score a1, column 3 scores a2 (column 4 would predict past the end).
    """
    n, width = batch["input_ids"].shape
    R = batch["response_ids"].shape[1]
    # Only the R columns that score response tokens go through the LM head (no [n, width, vocab] tensor).
    columns = torch.arange(width - R - 1, width - 1, device=batch["input_ids"].device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False, logits_to_keep=columns).logits
    flat = logits.reshape(n * R, -1)
    logp = token_logprobs(flat, batch["response_ids"].reshape(-1), temperature).view(n, R)
    if not with_entropy:
        return logp
    return logp, token_entropy(flat.detach(), temperature).view(n, R)


def response_values(critic, batch: dict) -> torch.Tensor:
    """Critic values of the states before each response token: column P-1+i for token i -> [n, R] fp32."""
    P, R = batch["prompt_width"], batch["response_ids"].shape[1]
    values = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"])
    return values[:, P - 1:P - 1 + R]


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation on the token grid.

    rewards, values, mask: [B, T] (mask 1 on response tokens, which start at column 0 and are contiguous).
    Returns (advantages, returns), both [B, T] and 0 off the mask; returns = advantages + values.
    The value after the last response token is 0 whether the response ended with EOS or was truncated (we do
    not bootstrap a truncated response; ReaLHF does).
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
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


# The advantage estimators: ESTIMATORS[name](reward, values, mask, groups, cfg) -> (advantages, returns or None).
#   reward   rewards.RolloutRewards: outcome [B], step rewards at their end tokens, kl [B, T], kept apart
#   values   [B, T] critic values, or None without a critic
#   mask     [B, T] 1 on response tokens;  groups [B] each response's prompt (a group never spans ranks)
# Advantages come back [B, T], 0 off the mask; returns are the critic's targets (None: no critic).
# To add an estimator, write one function and add one entry: the rest of the code stays the same.


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G[i, t] = sum_{t' >= t} gamma^(t' - t) r[i, t'] over the response; rewards, mask [B, T] -> [B, T].

        returns_to_go(tensor([[0., 1., 2., 0.]]), mask=tensor([[1., 1., 1., 0.]]), gamma=1) -> [[3., 3., 2., 0.]]
    """
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def group_ids(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Any group labels [B] -> (indices 0..n-1 [B], n)."""
    unique, index = torch.unique(groups, return_inverse=True)
    return index, len(unique)


def gae_advantages(reward, values, mask, groups, cfg):
    """GAE with the critic (the paper's): advantages whitened over all valid tokens of all ranks; returns
    A + V are the critic's targets."""
    advantages, returns = compute_gae(reward.on_tokens(mask), values, mask, cfg.gamma, cfg.lam)
    return whiten(advantages, mask), returns


def reinforce_pp_advantages(reward, values, mask, groups, cfg):
    """REINFORCE++ (arXiv 2501.03262): A = G, the return-to-go, whitened over all valid tokens of all ranks."""
    return whiten(returns_to_go(reward.on_tokens(mask), mask, cfg.gamma), mask), None


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


def group_normalise(x: torch.Tensor, index: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) over the entries of each group, std the sample std (n - 1); a group with
    fewer than two entries gives 0. x, index [N] (index in 0..n-1) -> [N]."""
    count = x.new_zeros(n).index_add_(0, index, torch.ones_like(x))
    mean = x.new_zeros(n).index_add_(0, index, x) / count.clamp_min(1)
    var = x.new_zeros(n).index_add_(0, index, (x - mean[index]) ** 2) / (count - 1).clamp_min(1)
    normalised = (x - mean[index]) / (var.sqrt()[index] + eps)
    return torch.where(count[index] >= 2, normalised, torch.zeros_like(x))


def grpo_advantages(reward, values, mask, groups, cfg):
    """GRPO (DeepSeekMath, arXiv 2402.03300, 4.1.2 outcome + 4.1.3 process supervision), with KL in the reward:

        A[i, t] = (R_out[i] - mean_g) / (std_g + eps) + sum_{k: end[i, k] >= t} s~[i, k] - beta * sum_{t' >= t} kl[i, t']
        s~[i, k] = alpha * (u[i, k] - mean) / (std + eps),  mean and std over all steps of the group's responses

    u are the transformed step rewards before alpha (normalising after alpha would cancel it); std is the
    sample std, eps = 1e-6; a group with fewer than two step rewards gets s~ = 0. Not whitened again. The
    step and KL sums are discounted by --gamma (1 by default, as in the paper's formula).
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


ESTIMATORS = {"gae": gae_advantages, "grpo": grpo_advantages, "rloo": rloo_advantages,
              "reinforce_pp": reinforce_pp_advantages}
NEEDS_CRITIC = {"gae"}  # every other estimator is critic-free: no critic is loaded, run, trained or saved


def policy_loss(logp, old_logp, advantages, mask, clip_eps: float, num_tokens: float):
    """Clipped-ratio PPO loss, summed over valid tokens and divided by `num_tokens` (the valid tokens of the
    whole minibatch over all micro-batches and ranks, so micro-batching does not change the gradient).

    All tensors [n, R]. Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    Returns (loss, number of tokens whose ratio was clipped).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    return loss, ((clipped > unclipped).float() * mask).sum().detach()


def value_loss(values, old_values, returns, mask, value_clip: float, num_tokens: float):
    """Clipped value loss 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2), summed over valid
    tokens and divided by `num_tokens` as in `policy_loss`. All tensors [n, R]."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask).sum() / num_tokens


# -------------------------------------------------------------------------------------------------
# Batching: length-sorted micro-batches under a token budget
# -------------------------------------------------------------------------------------------------


def micro_batches(indices: list[int], prompt_lens: list[int], response_lens: list[int], token_budget: int) -> list[list[int]]:
    """Group sequences, sorted by length, so that rows * (widest prompt + widest response) <= budget.

    Sorting keeps similar lengths together, so the padding inside a micro-batch stays small.
    """
    order = sorted(indices, key=lambda i: (prompt_lens[i] + response_lens[i], i))
    groups, current, p_max, r_max = [], [], 0, 0
    for i in order:
        p, r = max(p_max, prompt_lens[i]), max(r_max, response_lens[i])
        if current and (len(current) + 1) * (p + r) > token_budget:
            groups.append(current)
            current, p, r = [], prompt_lens[i], response_lens[i]
        current.append(i)
        p_max, r_max = p, r
    if current:
        groups.append(current)
    return groups


def collate(rollout: dict, idx: list[int], pad_id: int, device) -> dict:
    """Rows `idx` of the rollout as [left-padded prompt | right-padded response] tensors on `device`."""
    prompts = [rollout["prompt_ids"][i] for i in idx]
    responses = [rollout["response_ids"][i] for i in idx]
    P, R = max(len(p) for p in prompts), max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(idx), P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, P - len(p):P] = torch.tensor(p)
        input_ids[row, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[row, P - len(p):P + len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 response_ids=input_ids[:, P:])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["prompt_width"] = P
    for key in ("mask", "old_logp", "ref_logp", "values", "advantages", "returns"):
        if rollout.get(key) is not None:  # values and returns only under gae
            batch[key] = rollout[key][idx, :R].to(device)
    return batch


def equalise(groups: list[list[int]]) -> list[tuple[list[int], float]]:
    """Every rank must run the same number of forward passes under FSDP: pad the list with repeats of the
    first micro-batch that count with weight 0. Returns [(indices, weight)]."""
    n = all_reduce_max(len(groups))
    return [(g, 1.0) for g in groups] + [(groups[0], 0.0)] * (n - len(groups))


# -------------------------------------------------------------------------------------------------
# Checkpoints
# -------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, run: "Run", sampler, config: dict, *, step: int, keep: int):
    """Sharded checkpoint under <run_dir>/checkpoints/step_N, then an atomic `latest` pointer.

    Written into step_N.tmp and renamed when complete, so a kill mid-save leaves the previous one usable.
    Holds the trained models (policy, and the critic under gae) with their optimisers
    (torch.distributed.checkpoint), the RNG states of each rank, the data position and the step.
    """
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(run.trained_state(), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    rng = {"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]), dtype=torch.long)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{run.rank}.pt")
    barrier()
    if run.rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "sampler": sampler.state_dict(), "world_size": world_size(),
                                                    "config": config}, indent=1))
        latest = root / "latest"
        if final.exists() and not (latest.exists() and latest.read_text().strip() == final.name):
            shutil.rmtree(final)  # left by a kill between the rename and the pointer update: never pointed to
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, latest)
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


def check_resumable(cfg: Config, world: int) -> None:
    """A checkpoint continues only the configuration (as given on the command line) and world size it came from."""
    folder, state = latest_checkpoint(Path(cfg.output_dir))
    saved, current = state["config"], dataclasses.asdict(cfg)
    # A field the checkpoint predates had its value of then: gae, and the PRM's revision as pinned today.
    saved = {**{"advantage": "gae", "prm_revision": PINNED_PRM_REVISIONS.get(saved.get("prm"))}, **saved}
    diff = [k for k in current if k not in RESUMABLE_FIELDS and saved.get(k) != current[k]]
    if diff:
        raise SystemExit(f"--resume: checkpoint {folder} was written with a different config: " +
                         ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {current[k]!r})" for k in diff))
    if state["world_size"] != world:
        raise SystemExit(f"--resume: {folder} was saved by {state['world_size']} ranks, this run has {world}: "
                         "resume under the same number of ranks (the RNG state and the data slices are per rank)")


def load_checkpoint(run_dir: Path, run: "Run", sampler) -> int:
    """Restore everything `save_checkpoint` wrote from <run_dir>/checkpoints/latest; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder, state = latest_checkpoint(run_dir)
    sd = run.trained_state()
    dcp.load(sd, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    for name, (model, (optimizer, _)) in run.trained().items():
        set_state_dict(model, optimizer, model_state_dict=sd[name], optim_state_dict=sd[f"{name}_opt"])
    rng = torch.load(folder / f"rng_rank{run.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"].tolist()), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


def barrier():
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# -------------------------------------------------------------------------------------------------
# Setup
# -------------------------------------------------------------------------------------------------


TOY_WORLDS = ("toy", "toy-hard")  # the names of toy.WORLDS, so that toy.py is imported only when one is used


def resolve_local_models(cfg: Config, rank: int) -> None:
    """The `tiny`, `toy` and `toy-hard` presets name models that are built here (rank 0 first; later ranks reuse
    them)."""
    for turn in range(2):
        if (turn == 0) == (rank == 0):
            if cfg.model == "tiny":
                paths = models.build_tiny(Path(cfg.cache_dir) / "tiny")
                cfg.model = str(paths["policy"])
                if cfg.prm == "tiny":
                    cfg.prm = str(paths["token_classifier_prm" if cfg.prm_format == "token_classifier" else "step_tag_prm"])
                if cfg.orm == "tiny":
                    cfg.orm = str(paths["orm"])
            elif cfg.model in TOY_WORLDS:
                import toy

                cfg.model = str(toy.warm_start(Path(cfg.cache_dir) / "toy", cfg.seed, **toy.WORLDS[cfg.model]))
        barrier()


def load_problems(source: str, split: str, cfg: Config) -> list[dict]:
    if source == "tiny":
        return data.tiny_problems(seed=cfg.seed if split == "train" else cfg.seed + 1)
    if source in TOY_WORLDS:
        import toy

        world = toy.WORLDS[source]
        return toy.problems(5000 if split == "train" else 200, cfg.seed, split, world["min_ops"], world["max_ops"])
    try:
        return data.load_problems(source, split, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                                  skip_bad_rows=cfg.skip_bad_rows)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: a hub dataset out of reach
        raise SystemExit(f"{'--train-data' if split == 'train' else '--eval-data'}: {err}") from err


def load_prm(cfg: Config, device: torch.device, dtype: torch.dtype):
    """The PRM as a callable `prm(questions, steps) -> scores`, or None when the reward does not use one."""
    if cfg.reward not in rewards.STEP_TRANSFORMS or cfg.prm == "none":
        return None
    if ":" in cfg.prm and not Path(cfg.prm).exists():
        module_name, _, function_name = cfg.prm.partition(":")
        try:
            return getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise SystemExit(f"--prm {cfg.prm}: cannot import {function_name} from {module_name} ({err})") from err
    config = models.load_config(cfg.prm, "--prm", revision=cfg.prm_revision)
    remote_code = "AutoModel" in (getattr(config, "auto_map", None) or {})  # e.g. Qwen2.5-Math-PRM's own class
    prm_format = cfg.prm_format
    if prm_format == "auto":
        classifier = remote_code or any(a.endswith(("TokenClassification", "ProcessRewardModel"))
                                        for a in config.architectures or [])
        prm_format = "token_classifier" if classifier else "step_tag"
    tokenizer = models.load_tokenizer(cfg.prm, "--prm", cfg.trust_remote_code, revision=cfg.prm_revision)
    if prm_format == "step_tag":
        model = models.load_model(cfg.prm, flag="--prm", dtype=dtype, device=device, revision=cfg.prm_revision)
        prm = rewards.StepTagPRM(model.requires_grad_(False), tokenizer)
        expected = MATH_SHEPHERD_IDS.get(cfg.prm)
        if expected and (prm.good_id, prm.bad_id, prm.tag_id) != expected:
            raise SystemExit(f"--prm {cfg.prm}: its tokenizer gives ids {(prm.good_id, prm.bad_id, prm.tag_id)} for "
                             f"'+', '-', 'ки', but the model card reads {expected}: the tokenizer loads differently here")
        return prm
    if remote_code and not cfg.trust_remote_code:
        raise SystemExit(f"--prm {cfg.prm} runs model code from the hub; pass --trust-remote-code if you trust it")
    model = models.load_model(cfg.prm, "AutoModel" if remote_code else "AutoModelForTokenClassification",
                              flag="--prm", dtype=dtype, device=device, trust_remote_code=remote_code,
                              revision=cfg.prm_revision)
    return rewards.TokenClassifierPRM(model.requires_grad_(False), tokenizer)


def load_orm(cfg: Config, device: torch.device, dtype: torch.dtype):
    if cfg.reward != "orm":
        return None
    tokenizer = models.load_tokenizer(cfg.orm, "--orm", cfg.trust_remote_code)
    model = models.load_model(cfg.orm, "AutoModelForSequenceClassification", flag="--orm", dtype=dtype,
                              device=device, trust_remote_code=cfg.trust_remote_code)
    if model.config.pad_token_id is None:  # sequence classifiers find each row's last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    return rewards.SequenceORM(model.requires_grad_(False), tokenizer)


def warmup_then_constant(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


class RunLog:
    """metrics.jsonl (one line per step), samples.jsonl, TensorBoard when installed, wandb with
    --wandb-project; rank 0 only."""

    def __init__(self, run: Path, enabled: bool, resumed_step: int, cfg: Config):
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

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def samples(self, step: int, rows: list[dict]) -> None:
        if self.enabled:
            with open(self.run / "samples.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **row}) + "\n")


def start_wandb(run_dir: Path, cfg: Config):
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


@dataclass
class Run:
    """What a run holds on this rank, made once by `setup`: its models, their optimisers, how to grade."""

    policy: torch.nn.Module  # trained; FSDP2-sharded on several ranks
    reference: torch.nn.Module  # frozen copy of the initial policy: the KL anchor
    critic: models.Critic | None  # trained value model; None under a critic-free --advantage
    tokenizer: Any
    prm: Callable | None  # prm(questions, steps) -> one score in [0, 1] per step; None without step rewards
    orm: rewards.SequenceORM | None  # only for --reward orm
    optimizers: dict[str, tuple[torch.optim.Optimizer, Any]]  # "policy" (and "critic") -> (AdamW, LR schedule)
    device: torch.device
    rank: int
    world: int
    stop_ids: list[int]  # the token ids that end a response
    autocast: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast on one GPU, else a no-op
    checker: Callable[[list[str], list[str]], list[bool]] | None = None  # the answer checker, set by main

    def trained(self) -> dict[str, tuple[torch.nn.Module, tuple[torch.optim.Optimizer, Any]]]:
        """name -> (model, (optimiser, schedule)) for the policy and, under gae, the critic."""
        return {name: (model, self.optimizers[name]) for name, model in (("policy", self.policy), ("critic", self.critic))
                if model is not None}

    def trained_state(self) -> dict:
        """What a checkpoint holds: {"policy": ..., "policy_opt": ...} and the same for the critic if any."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state = {}
        for name, (model, (optimizer, _)) in self.trained().items():
            state[name], state[f"{name}_opt"] = get_state_dict(model, optimizer)
        return state


def setup(cfg: Config, rank: int, world: int, device: torch.device) -> Run:
    """Load (and on several ranks shard) every model and make the optimisers: what the run holds."""
    # Trained models in fp32 (bf16 compute on GPU). Frozen ones in bf16 under FSDP2 (the same numbers as the
    # policy's bf16 all-gather) and for the PRM/ORM; a single GPU keeps the reference in fp32 under autocast like
    # the policy, so that KL is exactly 0 at the first step.
    gpu = device.type == "cuda"
    reference_dtype = torch.bfloat16 if gpu and world > 1 else torch.float32
    scorer_dtype = torch.bfloat16 if gpu else torch.float32
    load_device = torch.device("cpu") if world > 1 else device

    def place(model: torch.nn.Module, trained: bool) -> torch.nn.Module:
        if world > 1:
            models.shard(model, trained=trained, gpu=gpu)
        return model.to(device)

    tokenizer = models.load_tokenizer(cfg.model, "--model", cfg.trust_remote_code)
    policy = models.load_model(cfg.model, flag="--model", device=load_device, trust_remote_code=cfg.trust_remote_code)
    critic = None
    if cfg.advantage in NEEDS_CRITIC:
        critic = models.Critic.load(cfg.critic or cfg.model, flag="--critic" if cfg.critic else "--model",
                                    device=load_device, trust_remote_code=cfg.trust_remote_code)
    for model in (policy, critic.backbone if critic else None):
        if model is not None and cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = place(policy, trained=True)
    critic = place(critic, trained=True) if critic is not None else None
    reference = place(models.load_model(cfg.model, flag="--model", dtype=reference_dtype, device=load_device,
                                        trust_remote_code=cfg.trust_remote_code).requires_grad_(False), trained=False)
    prm, orm = load_prm(cfg, load_device, scorer_dtype), load_orm(cfg, load_device, scorer_dtype)
    for scorer in (prm, orm):
        if isinstance(getattr(scorer, "model", None), torch.nn.Module):
            scorer.model = place(scorer.model, trained=False)
    optimizers = {}
    for name, model, lr in (("policy", policy, cfg.policy_lr), ("critic", critic, cfg.critic_lr)):
        if model is not None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            optimizers[name] = (optimizer, warmup_then_constant(optimizer, cfg.warmup_steps))
    return Run(policy=policy, reference=reference, critic=critic, tokenizer=tokenizer, prm=prm, orm=orm,
               optimizers=optimizers, device=device, rank=rank, world=world,
               stop_ids=models.stop_token_ids(policy, tokenizer),
               # One GPU: autocast gives bf16 compute over fp32 weights (under FSDP2 its mixed precision does that).
               autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu and world == 1 else contextlib.nullcontext)


# -------------------------------------------------------------------------------------------------
# The PPO step: 1-2 `rollout` (`sample`, `score`, `grade`), 3-5 `train_on_rollout` (rewards, advantages),
# 6 `update`, then `step_metrics`
# -------------------------------------------------------------------------------------------------


def rollout(cfg: Config, batch: list[dict], run: Run) -> dict:
    """Stages 1 and 2 for this rank's problems: sample responses, then score and grade them.

    Returns a dict with per-response lists (`prompt_ids`, `response_ids`, `texts`, `steps`, `step_ends`,
    `step_scores`, `problems`) and tensors: `mask`, `old_logp`, `ref_logp` (and `values` under gae) [B, R];
    `success`, `correct`, `truncated`, `orm_scores`, `groups` (each response's prompt) [B]. This is what a
    saved rollout holds.
    """
    t0 = time.perf_counter()
    ro = sample(cfg, batch, run)
    t1 = time.perf_counter()
    score(cfg, ro, run)
    grade(cfg, ro, run)
    ro["time"] = {"time/rollout": t1 - t0, "time/score": time.perf_counter() - t1}
    return ro


def sample(cfg: Config, batch: list[dict], run: Run) -> dict:
    """1. samples_per_prompt responses per problem, sampled with explicit settings, from weights all-gathered
    once (FSDP2) rather than once per generated token. Rows of one problem are adjacent: B = len(batch) * n."""
    problems = [p for p in batch for _ in range(cfg.samples_per_prompt)]
    prompt_ids = [p["prompt_ids"] for p in problems]
    run.policy.eval()
    response_ids: list[list[int]] = []
    with models.gathered(run.policy), run.autocast():
        for start in range(0, len(prompt_ids), cfg.generation_batch_size):
            response_ids += models.generate(run.policy, prompt_ids[start:start + cfg.generation_batch_size],
                                            pad_id=run.tokenizer.pad_token_id, stop_ids=run.stop_ids,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    R = max(max(len(r) for r in response_ids), 1)
    lengths = torch.tensor([len(r) for r in response_ids])
    return dict(problems=problems, prompt_ids=prompt_ids, response_ids=response_ids,
                texts=run.tokenizer.batch_decode(response_ids, skip_special_tokens=True),
                mask=(torch.arange(R)[None, :] < lengths[:, None]).float(),  # [B, R]
                truncated=torch.tensor([not r or r[-1] not in run.stop_ids for r in response_ids]),  # [B]
                groups=torch.arange(len(batch)).repeat_interleave(cfg.samples_per_prompt))  # [B]


@torch.no_grad()
def score(cfg: Config, ro: dict, run: Run) -> None:
    """2a. Log-probs of the sampling policy and of the reference (both at the sampling temperature) and, under
    gae, the critic's values: `old_logp`, `ref_logp`, `values` [B, R], 0 off the mask."""
    B, R = ro["mask"].shape
    scored = {"old_logp": run.policy, "ref_logp": run.reference, "values": run.critic}
    scored = {key: model for key, model in scored.items() if model is not None}
    ro.update({key: torch.zeros(B, R) for key in scored})
    lengths = [len(r) for r in ro["response_ids"]]
    groups = micro_batches(list(range(B)), [len(p) for p in ro["prompt_ids"]], lengths, cfg.micro_batch_tokens)
    with run.autocast():
        for idx, _ in equalise(groups):
            mb = collate(ro, idx, run.tokenizer.pad_token_id, run.device)
            width = mb["response_ids"].shape[1]
            for key, model in scored.items():
                out = response_values(model, mb) if key == "values" else response_logprobs(model, mb, cfg.temperature)
                ro[key][idx, :width] = out.float().cpu()
    for key in scored:
        ro[key] *= ro["mask"]


def grade(cfg: Config, ro: dict, run: Run) -> None:
    """2b. Answers (`correct`, `success` [B]: a truncated response never succeeds), steps and their end tokens,
    PRM step scores (lists of [K_b]) and ORM scores (`orm_scores` [B], 0 without an ORM)."""
    questions = [p["problem"] for p in ro["problems"]]
    ro["correct"] = torch.tensor(run.checker(ro["texts"], [p["answer"] for p in ro["problems"]]))
    ro["success"] = (ro["correct"] & ~ro["truncated"]).float()
    ro["steps"] = [rewards.split_steps(t, cfg.step_delimiter) for t in ro["texts"]]
    ro["step_ends"] = [rewards.step_end_indices(r, run.tokenizer, cfg.step_delimiter) for r in ro["response_ids"]]
    # A sharded PRM/ORM is gathered once for the whole batch: its forwards then need no collectives, so ranks
    # may run different numbers of them (the adapters skip responses without steps).
    ro["step_scores"] = [[] for _ in questions]
    if run.prm is not None:
        with models.gathered(getattr(run.prm, "model", None)):
            ro["step_scores"] = run.prm(questions, ro["steps"])
    ro["orm_scores"] = torch.zeros(len(questions))
    if run.orm is not None:
        with models.gathered(run.orm.model):
            ro["orm_scores"] = torch.tensor(run.orm(questions, ro["texts"]))


def train_on_rollout(cfg: Config, step: int, ro: dict, run: Run) -> dict:
    """Stages 3 to 6 on a scored rollout (this rank's share); returns the step's metrics (all ranks).

    What the stages make is kept in `ro` (`step_rewards`, `advantages`, `returns`) for samples.jsonl and tests.
    """
    t0 = time.perf_counter()
    # 3. Rewards in three parts: outcome (success + alpha * ORM), alpha * step rewards at the tokens that end
    #    the steps, KL per token (rewards.RolloutRewards).
    reward = rewards.RolloutRewards.of_rollout(ro, cfg)
    # 4-5. Advantages (and the critic's targets) by --advantage; each estimator whitens, or not, as it should.
    advantages, returns = ESTIMATORS[cfg.advantage](reward, ro.get("values"), ro["mask"], ro["groups"], cfg)
    ro.update(step_rewards=reward.step_rewards, advantages=advantages, returns=returns)
    # 6. Update the policy (and critic).
    sums = update(cfg, step, ro, run)
    return step_metrics(cfg, ro, reward, sums, run, update_time=time.perf_counter() - t0)


@dataclass
class UpdateSums:
    """Sums over this rank's valid tokens and optimiser steps during `update`; reduced over ranks for metrics."""

    policy_loss: float = 0.0
    value_loss: float = 0.0
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


def update(cfg: Config, step: int, ro: dict, run: Run) -> UpdateSums:
    """6. ppo_epochs passes over shuffled minibatches, one optimiser step per minibatch.

    Losses are normalised by the minibatch's valid tokens over all micro-batches and ranks, and multiplied by
    the world size because FSDP2 averages gradients over ranks: the gradient is then independent of both.
    """
    for model, _ in run.trained().values():
        model.train()
    B = ro["mask"].shape[0]
    prompt_lens, response_lens = [len(p) for p in ro["prompt_ids"]], [len(r) for r in ro["response_ids"]]
    sums = UpdateSums()
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + run.rank)
    minibatch_size = B // cfg.ppo_minibatches
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=shuffle).tolist()
        for m in range(cfg.ppo_minibatches):
            idx = order[m * minibatch_size:(m + 1) * minibatch_size]
            num_tokens = all_reduce(ro["mask"][idx].sum()).item()
            for micro, weight in equalise(micro_batches(idx, prompt_lens, response_lens, cfg.micro_batch_tokens)):
                mb = collate(ro, micro, run.tokenizer.pad_token_id, run.device)
                backward_micro_batch(cfg, step, mb, weight, num_tokens, run, sums)
            optimizer_step(cfg, run, sums)
    return sums


def backward_micro_batch(cfg: Config, step: int, mb: dict, weight: float, num_tokens: float, run: Run,
                         sums: UpdateSums) -> None:
    """Policy forward and backward, then the critic's: only one activation graph is alive at a time.
    `weight` 0 marks a repeat that only keeps the ranks' collectives in step (see `equalise`)."""
    with run.autocast():
        logp, entropy = response_logprobs(run.policy, mb, cfg.temperature, with_entropy=True)  # [n, R]
    p_loss, clipped = policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], cfg.clip_eps, num_tokens)
    (p_loss * weight * run.world).backward()
    v_loss = torch.zeros(())
    if run.critic is not None:
        with run.autocast():
            new_values = response_values(run.critic, mb)  # [n, R]
        v_loss = value_loss(new_values, mb["values"], mb["returns"], mb["mask"], cfg.value_clip, num_tokens)
        (v_loss * weight * run.world).backward()
    # Every rank must stop together, or the others wait forever in the next collective.
    if all_reduce(torch.tensor([float(not (torch.isfinite(p_loss) and torch.isfinite(v_loss)))])).item():
        raise RuntimeError(f"step {step}: non-finite loss on some rank (here: policy {p_loss.item()}, value "
                           f"{v_loss.item()}); stopping, the last checkpoint in {cfg.output_dir}/checkpoints is kept")
    if weight == 0:
        return
    with torch.no_grad():
        log_ratio = (logp - mb["old_logp"]) * mb["mask"]
        if sums.first_ratio_error is None:
            sums.first_ratio_error = log_ratio.abs().max().item()
        sums.policy_loss += p_loss.item()
        sums.value_loss += v_loss.item()
        sums.clipped += clipped.item()
        sums.approx_kl += ((log_ratio.exp() - 1 - log_ratio) * mb["mask"]).sum().item()  # k3 of KL(old||new)
        sums.ratio += (log_ratio.exp() * mb["mask"]).sum().item()
        sums.entropy += (entropy * mb["mask"]).sum().item()
        sums.tokens += mb["mask"].sum().item()


def optimizer_step(cfg: Config, run: Run, sums: UpdateSums) -> None:
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


def equal_outcome_groups(outcome: torch.Tensor, groups: torch.Tensor) -> int:
    """How many groups have all outcome rewards equal (zero outcome advantage under grpo and rloo)."""
    index, n = group_ids(groups)
    low = torch.full((n,), float("inf")).scatter_reduce(0, index, outcome.float(), "amin")
    high = torch.full((n,), -float("inf")).scatter_reduce(0, index, outcome.float(), "amax")
    return int((low == high).sum())


def step_metrics(cfg: Config, ro: dict, reward: rewards.RolloutRewards, sums: UpdateSums, run: Run,
                 update_time: float) -> dict:
    """The step's metrics in named groups: this rank's sums, one reduction over ranks, then ratios."""
    mask, returns, values = ro["mask"], ro["returns"], ro.get("values")  # returns: None without a critic
    B, valid = mask.shape[0], mask.bool()
    per_rank = {f.name: getattr(sums, f.name) for f in dataclasses.fields(sums) if f.name != "first_ratio_error"}
    per_rank.update(
        responses=B, prompt_tokens=sum(len(p) for p in ro["prompt_ids"]), success=ro["success"].sum(),
        correct=ro["correct"].sum(), process=sum(r.sum() for r in reward.step_rewards),
        outcome=(reward.outcome - ro["success"]).sum(), kl=reward.kl.sum(), length=mask.sum(),
        steps=sum(len(s) for s in ro["steps"]), truncated=ro["truncated"].sum(),
        groups=len(torch.unique(ro["groups"])), equal_groups=equal_outcome_groups(reward.outcome, ro["groups"]))
    if returns is not None:
        error = (returns - values)[valid]
        per_rank.update(error=error.sum(), error_sq=(error ** 2).sum(), returns=returns[valid].sum(),
                        returns_sq=(returns[valid] ** 2).sum(), values=values[valid].sum())
    keys = list(per_rank)
    t = dict(zip(keys, all_reduce(torch.tensor([float(per_rank[k]) for k in keys], dtype=torch.float64)).tolist()))
    n, tokens, valid_tokens, steps = t["responses"], t["tokens"], t["length"], t["optimizer_steps"]
    rollout_time = ro["time"]["time/rollout"] + ro["time"]["time/score"]
    metrics = {
        "reward/success": t["success"] / n, "reward/correct_answer": t["correct"] / n,
        "reward/process": t["process"] / n, "reward/outcome_model": t["outcome"] / n,
        "reward/kl": -cfg.beta * t["kl"] / n,
        "reward/total": (t["success"] + t["process"] + t["outcome"] - cfg.beta * t["kl"]) / n,
        "response/length": valid_tokens / n, "response/steps": t["steps"] / n, "response/truncated": t["truncated"] / n,
        "advantage/equal_outcome_groups": t["equal_groups"] / t["groups"],
        "loss/policy": t["policy_loss"] / steps,
        "policy/clip_frac": t["clipped"] / tokens, "policy/approx_kl": t["approx_kl"] / tokens,
        "policy/ratio": t["ratio"] / tokens, "policy/entropy": t["entropy"] / tokens,
        "policy/ref_kl": t["kl"] / n, "policy/first_ratio_error": sums.first_ratio_error,
        "policy/grad_norm": t["policy_grad_norm"] / steps,
        "answer/timeouts": getattr(run.checker, "timeouts", 0),
        **ro["time"], "time/update": update_time, "time/step": rollout_time + update_time,
        "throughput/tokens_per_s": (valid_tokens + t["prompt_tokens"]) / (rollout_time + update_time),
        "throughput/generated_tokens_per_s": valid_tokens / max(ro["time"]["time/rollout"], 1e-9),
    }
    if returns is not None:
        def variance(total: float, squares: float) -> float:  # over the valid tokens of all ranks
            return squares / valid_tokens - (total / valid_tokens) ** 2

        metrics.update({"loss/value": t["value_loss"] / steps, "value/grad_norm": t["value_grad_norm"] / steps,
                        "value/explained_var": 1 - variance(t["error"], t["error_sq"])
                        / max(variance(t["returns"], t["returns_sq"]), 1e-12),
                        "value/mean": t["values"] / valid_tokens})
    if run.device.type == "cuda":  # this rank's peak since the run started
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return {k: float(v) for k, v in metrics.items()}


def sample_rows(ro: dict, k: int = 4) -> list[dict]:
    """The first k completions of this rank with their rewards, for samples.jsonl."""
    return [dict(problem=ro["problems"][i]["problem"], answer=ro["problems"][i]["answer"], response=ro["texts"][i],
                 success=float(ro["success"][i]), truncated=bool(ro["truncated"][i]),
                 step_scores=[float(s) for s in ro["step_scores"][i]], step_rewards=ro["step_rewards"][i].tolist())
            for i in range(min(k, len(ro["texts"])))]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    rank, world, device = models.init_distributed()
    validate(cfg, world)
    requested = dataclasses.asdict(cfg)  # as given, before local models resolve to paths: what --resume compares
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_local_models(cfg, rank)
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    # Data first: a bad source or row fails before any model is loaded. The order is the same on every rank;
    # each rank takes its slice of every step's problems.
    train_rows = load_problems(cfg.train_data, "train", cfg)
    eval_problems = load_problems(cfg.eval_data, "test", cfg)[:cfg.eval_size] if cfg.eval_every else None
    run = setup(cfg, rank, world, device)
    torch.manual_seed(cfg.seed + rank)  # per-rank sampling seed, set after loading; the data order has its own
    random.seed(cfg.seed + rank)
    problems, dropped = data.tokenize_prompts(run.tokenizer, train_rows, cfg.max_prompt_tokens)
    if rank == 0 and dropped:
        print(f"--train-data: dropped {dropped} prompts longer than --max-prompt-tokens {cfg.max_prompt_tokens}", file=sys.stderr)
    sampler = data.PromptSampler(problems, cfg.prompts_per_step, seed=cfg.seed)
    per_rank = cfg.prompts_per_step // world

    start = 0
    if cfg.resume:
        start = load_checkpoint(run_dir, run, sampler)
        for _, scheduler in run.optimizers.values():  # the schedule is a function of the optimiser step count
            scheduler.last_epoch = start * cfg.ppo_epochs * cfg.ppo_minibatches - 1
            scheduler.step()
    log = RunLog(run_dir, rank == 0, start, cfg)

    with rewards.AnswerChecker(cfg.answer_workers, cfg.answer_timeout) as checker, contextlib.closing(log):
        run.checker = checker
        bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0, desc="ppo")
        for step in bar:
            ro = rollout(cfg, sampler.next_batch()[rank * per_rank:(rank + 1) * per_rank], run)
            metrics = train_on_rollout(cfg, step, ro, run)
            if cfg.eval_every and step % cfg.eval_every == 0:
                run.policy.eval()
                with models.gathered(run.policy), run.autocast():
                    result = evaluation.evaluate(run.policy, run.tokenizer, eval_problems, max_new_tokens=cfg.max_new_tokens,
                                                 batch_size=cfg.generation_batch_size, checker=checker)
                metrics["eval/accuracy"] = float(result["accuracy"])
            log.metrics(step, metrics)
            if cfg.log_samples_every and step % cfg.log_samples_every == 0:
                log.samples(step, sample_rows(ro))
            bar.set_postfix(success=f"{metrics['reward/success']:.2f}", len=f"{metrics['response/length']:.0f}",
                            steps=f"{metrics['response/steps']:.1f}", kl=f"{metrics['policy/ref_kl']:.3f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save_checkpoint(run_dir, run, sampler, requested, step=step, keep=cfg.keep_checkpoints)
    for name, (model, _) in run.trained().items():  # the critic only under gae: what --critic loads
        models.export_hf(model, run.tokenizer, run_dir / name, rank)
    if rank == 0:
        print(f"done: metrics in {run_dir / 'metrics.jsonl'}, policy in {run_dir / 'policy'}", file=sys.stderr)


if __name__ == "__main__":
    main()
    models.end_distributed()  # under torchrun: end the rank safely (see its docstring); alone: nothing
