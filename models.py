"""Models for PPO: loading the policy, frozen reference, critic (backbone + scalar value head), PRM and ORM;
per-token log-probs and values of a micro-batch; what a run holds (`load_run`, `Run`); torch.distributed and
FSDP2 (sharding, generation with gathered weights, resharding, HF export).

Everything a run needs from the Hugging Face model zoo goes through here, so the rules live in one place:
- weights from outside are read as safetensors only (`use_safetensors=True`); hub code runs only when the
  user passed `--trust-remote-code`;
- dropout is off everywhere (PPO ratios must be 1 when nothing changed);
- trained models (policy, critic) keep fp32 weights (AdamW steps of lr 1e-6 vanish in bf16 weights) and
  compute in bf16 on GPU; frozen models (reference, PRM, ORM) may be stored in bf16;
- attention is flash-attn 2 when installed, else PyTorch sdpa.

`build_tiny` writes a tiny byte-level BPE tokenizer and tiny Qwen2 models (policy, two PRM formats, ORM) into
a folder, loadable with `from_pretrained`; the `tiny` preset and the tests use it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------


def attn_implementation() -> str:
    """flash-attn 2 when it is installed (the `gpu` extra), else PyTorch's sdpa."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


REVISION_FLAGS = {"--prm"}  # model flags with a --X-revision companion in ppo.py


def _hub_error(flag: str, name: str, err: Exception, revision: str | None = None) -> SystemExit:
    """The one-line exit for a model that cannot be loaded: names the flag, the cause and what to try."""
    folder = Path(name).expanduser()
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if folder.is_dir():
        if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
            return SystemExit(f"{flag}: '{name}' has only pickled .bin weights, and we load safetensors only (a "
                              "pickle can run code): convert the folder's weights to safetensors")
        return SystemExit(f"{flag}: could not load the local folder '{name}' ({type(err).__name__}: {reason}); it "
                          "needs what from_pretrained reads (config.json, safetensors weights, tokenizer files)")
    at = f" at revision {revision}" if revision else ""
    if re.search(r"(no file named|does not appear to have a file named) \S*\.safetensors", str(err)):
        revision_flag = f"{flag}-revision" if flag in REVISION_FLAGS else "another revision"
        return SystemExit(f"{flag}: '{name}'{at} has no safetensors weights, and we never load pickles (they can run "
                          f"code): try {revision_flag} with a branch that has them (the hub's conversion bot leaves "
                          "them on a PR branch such as refs/pr/1)")
    return SystemExit(f"{flag}: could not load '{name}'{at} ({type(err).__name__}: {reason}); it is neither a local "
                      "folder nor reachable on the Hugging Face hub. Without hub access, try `--preset tiny` or "
                      "`--preset toy`, which build their models locally")


def load_config(name: str, flag: str, trust_remote_code: bool = False, revision: str | None = None):
    """A model's config (no weights, no code unless trusted), with the error that names the flag."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise _hub_error(flag, name, err, revision) from err


def load_tokenizer(name: str, flag: str = "--model", trust_remote_code: bool = False, revision: str | None = None):
    """Tokenizer with left padding (prompts are left-padded for generation) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left", trust_remote_code=trust_remote_code,
                                            revision=revision)
    except (OSError, ValueError) as err:
        raise _hub_error(flag, name, err, revision) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    auto_class: str = "AutoModelForCausalLM",
    *,
    flag: str = "--model",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs,
) -> nn.Module:
    """Load `name` (local folder or hub id, at `revision`: a branch, tag or commit; None is main) with a
    transformers Auto class, safetensors only, dropout off."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        model = cls.from_pretrained(
            name,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation(),
            **kwargs,
        )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise SystemExit(f"{flag}: '{name}' needs code from the hub; pass --trust-remote-code if you trust it") from err
        raise _hub_error(flag, name, err, revision) from err
    disable_dropout(model)
    return model.to(device)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (train() mode must not change the forward pass)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's eos list (Qwen lists two) plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt with HF `generate` (KV cache on); returns response ids up to and
    including the first stop id (no stop id within `max_new_tokens`: the response is truncated).

    Prompts are left-padded so every response starts at the same column. Every sampling setting is passed
    explicitly, because a checkpoint's generation_config.json carries its own defaults (Qwen: top_k 40,
    top_p 0.7, repetition penalty 1.1) and a rollout sampled with them would not come from the
    distribution that PPO's log-probs assume. Under FSDP2 call this inside `models.gathered(model)`.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    # A fresh config, not the checkpoint's: nothing but these settings shapes the distribution.
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                              repetition_penalty=1.0, use_cache=True, **sampling)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)
    responses = []
    stop = set(stop_ids)
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
        responses.append(row[:end])
    return responses


# -------------------------------------------------------------------------------------------------
# Per-token log-probs and values of a micro-batch (data.MicroBatch), in fp32
# -------------------------------------------------------------------------------------------------


def _chunk_logprobs(x, weight, bias, targets, temperature: float, with_entropy: bool):
    """One chunk: log softmax(logits / T) at the targets [c] (and the entropy, for logging), in fp32. With a head
    `weight` [V, H], x are hidden states [c, H] and the logits are made here, the matmul in fp32 whatever the
    dtypes; without one (None), x are fp32 logits [c, V] already."""
    logits = x if weight is None else F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    logits = logits.float() / temperature
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        all_logp = F.log_softmax(logits, dim=-1)
        return logp, -(all_logp.exp() * all_logp).sum(-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                   bias: torch.Tensor | None = None, with_entropy: bool = False, chunk_rows: int = 1024):
    """log softmax(hidden @ weight.T / T)[target], fp32, `chunk_rows` rows at a time (and the entropy per row).

    hidden [N, H] (the final hidden states), weight [V, H] (the LM head as the forward gathers it: bf16 under
    mixed precision), targets [N] -> [N] fp32. Given bf16 operands, each chunk's logits come from an fp32 matmul
    of both cast, so a policy whose weights are gathered in bf16 and a reference stored in bf16 give equal
    log-probs, and no [N, V] fp32 tensor exists (with a 152k vocabulary it would be the largest of the step);
    under autograd each chunk is recomputed in the backward pass instead of kept. Given fp32 operands the head
    is one matmul, as the model's own forward does it (the fp32 logits exist then anyway), and only the
    log-softmax is chunked.
    """
    fp32 = hidden.dtype == weight.dtype == torch.float32
    source = F.linear(hidden, weight, bias) if fp32 else hidden  # fp32 logits [N, V], or hidden states [N, H]
    head = (None, None) if fp32 else (weight, bias)
    logp, entropy = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        chunk = (source[start:start + chunk_rows], *head, targets[start:start + chunk_rows], temperature, with_entropy)
        out = (torch.utils.checkpoint.checkpoint(_chunk_logprobs, *chunk, use_reentrant=False)
               if torch.is_grad_enabled() and (source.requires_grad or weight.requires_grad) else _chunk_logprobs(*chunk))
        logp.append(out[0] if with_entropy else out)
        entropy.append(out[1] if with_entropy else None)
    logp = torch.cat(logp) if logp else hidden.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return logp
    return logp, (torch.cat(entropy) if entropy else hidden.new_zeros(0, dtype=torch.float32))


def _response_head(model, input_ids, attention_mask, position_ids, prompt_width: int, temperature: float,
                   with_entropy: bool):
    """The body of `response_logprobs`, bound to a causal LM as its method `response_head`; under FSDP2 it is
    registered as a forward method, so the root's parameters (embedding, final norm, LM head) are gathered for
    it as for `forward`, and the head's matmul runs inside the root's forward."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # [n, P + R, H]
    n, width, _ = hidden.shape
    R = width - prompt_width
    # Only the R columns that score response tokens go through the LM head (no [n, width, vocab] tensor).
    hidden = hidden[:, prompt_width - 1:width - 1].reshape(n * R, -1)
    head = model.get_output_embeddings()
    out = token_logprobs(hidden, head.weight, input_ids[:, prompt_width:].reshape(-1), temperature,
                         bias=head.bias, with_entropy=with_entropy)
    # New tensors, not views: FSDP2 warns about a forward that returns a view (an in-place op would skip its hook).
    return (out[0].view(n, R).clone(), out[1].view(n, R).clone()) if with_entropy else out.view(n, R).clone()


def response_logprobs(model, batch, temperature: float, with_entropy: bool = False):
    """Log-probs of the response tokens under `model`, temperature-scaled: -> [n, R] fp32 (and entropy [n, R]).

    The batch is laid out [left-padded prompt (P columns) | right-padded response (R columns)]. Logits at
    position t predict token t+1, so response token i is scored by the logits at column P-1+i, i.e. columns
    P-1 .. P+R-2. Example, P=3, R=2:
        columns   0    1    2    3    4
        tokens    pad  q1   q2   a1   a2
        logits at column 2 score a1, column 3 scores a2 (column 4 would predict past the end).
    The logits are made in fp32 from the final hidden states and the LM head (`token_logprobs`).
    """
    head = getattr(model, "response_head", None) or types.MethodType(_response_head, model)
    return head(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width, temperature,
                with_entropy)


def response_values(critic, batch) -> torch.Tensor:
    """Critic values of the states before each response token: column P-1+i for token i -> [n, R] fp32."""
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    values = critic(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return values[:, P - 1:P - 1 + R]


class ValueHead(nn.Linear):
    """The critic's scalar head, hidden [..., H] -> values [...]: a matrix-vector product rather than a Linear
    and squeeze(-1) (FSDP2 warns about modules that return views). Its weights stay fp32 at every precision."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight[0] + self.bias


class Critic(nn.Module):
    """Value model: a transformer backbone with a scalar head, V(state before token t) for every position.

    Built from the policy's backbone plus a fresh zero-initialised head (so every value starts at 0 and the
    first advantages are the returns), or re-loaded from a folder written by `save`.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.value_head = ValueHead(backbone.config.hidden_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """input_ids [B, T] -> values [B, T] in fp32."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.value_head(hidden.float()).float()  # the hidden states cast: the head computes in fp32

    @classmethod
    def load(cls, name: str, *, flag: str, device="cpu", trust_remote_code=False) -> "Critic":
        """From a policy checkpoint (fresh zero head) or from a critic folder written by `save` (its head too).
        Weights in fp32: the critic is trained."""
        from safetensors.torch import load_file

        backbone = load_model(name, "AutoModel", flag=flag, device=device, trust_remote_code=trust_remote_code)
        critic = cls(backbone).to(device=device)
        head = Path(name) / "value_head.safetensors"
        if head.is_file():
            critic.value_head.load_state_dict(load_file(str(head), device=str(device)))
        return critic

    def save(self, folder: str | Path, state_dict: dict | None = None) -> None:
        """Backbone as an HF folder plus value_head.safetensors; `Critic.load(folder)` restores both."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head_state = {k[len("value_head."):]: v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
        self.backbone.save_pretrained(folder, state_dict=backbone_state, safe_serialization=True)
        save_file(head_state, str(Path(folder) / "value_head.safetensors"))


# -------------------------------------------------------------------------------------------------
# Reward models: the PRM and ORM loading rules
# -------------------------------------------------------------------------------------------------

# (good, bad, tag) token ids of the Math-Shepherd PRM as its model card reads them: a guard against a tokenizer
# that loads differently (the scores would be silently wrong).
MATH_SHEPHERD_IDS = {"peiyi9979/math-shepherd-mistral-7b-prm": (648, 387, 12902)}

# Hub PRMs whose main branch has pickled weights only: the revision holding the hub's safetensors conversion,
# used when --prm-revision is not given.
PINNED_PRM_REVISIONS = {"peiyi9979/math-shepherd-mistral-7b-prm": "refs/pr/5"}

PRM_FORMATS = ("step_tag", "token_classifier")


def prm_format_of(config) -> str:
    """"token_classifier" (Qwen2.5-Math-PRM: a token classifier, or the hub's own class) or "step_tag"
    (Math-Shepherd: a causal LM scored at a tag token), read from a PRM's config."""
    remote_code = "AutoModel" in (getattr(config, "auto_map", None) or {})
    classifier = remote_code or any(a.endswith(("TokenClassification", "ProcessRewardModel"))
                                    for a in config.architectures or [])
    return "token_classifier" if classifier else "step_tag"


def load_prm(spec: str, adapters: dict, *, prm_format: str = "auto", revision: str | None = None,
             trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, device="cpu"):
    """The PRM named by `spec` (`--prm`) as a callable `prm(questions, steps) -> scores`, frozen.

    `spec` is a hub id or folder, or `module:function` (any callable with that interface, e.g. the toy's step
    verifier). A model is wrapped by `adapters[format](model, tokenizer)` (ppo.py passes rewards.StepTagPRM and
    rewards.TokenClassifierPRM); the format comes from the PRM's config unless `prm_format` names it.
    """
    if ":" in spec and not Path(spec).exists():
        module_name, _, function_name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise SystemExit(f"--prm {spec}: cannot import {function_name} from {module_name} ({err})") from err
    config = load_config(spec, "--prm", revision=revision)
    remote_code = "AutoModel" in (getattr(config, "auto_map", None) or {})  # e.g. Qwen2.5-Math-PRM's own class
    prm_format = prm_format_of(config) if prm_format == "auto" else prm_format
    if prm_format == "token_classifier" and remote_code and not trust_remote_code:
        raise SystemExit(f"--prm {spec} runs model code from the hub; pass --trust-remote-code if you trust it")
    auto_class = {"step_tag": "AutoModelForCausalLM",
                  "token_classifier": "AutoModel" if remote_code else "AutoModelForTokenClassification"}[prm_format]
    tokenizer = load_tokenizer(spec, "--prm", trust_remote_code, revision=revision)
    model = load_model(spec, auto_class, flag="--prm", dtype=dtype, device=device,
                       trust_remote_code=remote_code and prm_format == "token_classifier", revision=revision)
    prm = adapters[prm_format](model.requires_grad_(False), tokenizer)
    expected = MATH_SHEPHERD_IDS.get(spec)
    if expected and prm_format == "step_tag" and (prm.good_id, prm.bad_id, prm.tag_id) != expected:
        raise SystemExit(f"--prm {spec}: its tokenizer gives ids {(prm.good_id, prm.bad_id, prm.tag_id)} for "
                         f"'+', '-', 'ки', but the model card reads {expected}: the tokenizer loads differently here")
    return prm


def load_orm(spec: str, adapter, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
             device="cpu"):
    """The ORM named by `spec` (`--orm`): a sequence classifier with one logit, frozen, wrapped by
    `adapter(model, tokenizer)` (rewards.SequenceORM)."""
    tokenizer = load_tokenizer(spec, "--orm", trust_remote_code)
    model = load_model(spec, "AutoModelForSequenceClassification", flag="--orm", dtype=dtype, device=device,
                       trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:  # sequence classifiers find each row's last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    return adapter(model.requires_grad_(False), tokenizer)


# -------------------------------------------------------------------------------------------------
# What a PPO run holds: its models (loaded, sharded), their optimisers
# -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run holds on this rank, made once by `load_run`: its models, their optimisers, how to grade."""

    policy: nn.Module  # trained; FSDP2-sharded on several ranks
    reference: nn.Module  # frozen copy of the initial policy: the KL anchor
    critic: Critic | None  # trained value model; None under a critic-free --advantage
    tokenizer: Any
    prm: Callable | None  # prm(questions, steps) -> one score in [0, 1] per step; None without step rewards
    orm: Callable | None  # orm(questions, responses) -> one score per response; only for --reward orm
    optimizers: dict[str, tuple[torch.optim.Optimizer, Any]]  # "policy" (and "critic") -> (AdamW, LR schedule)
    device: torch.device
    rank: int
    world: int
    stop_ids: list[int]  # the token ids that end a response
    checker: Callable[[list[str], list[str]], list[bool]] | None = None  # the answer checker, set by ppo.main

    def trained(self) -> dict[str, tuple[nn.Module, tuple[torch.optim.Optimizer, Any]]]:
        """name -> (model, (optimiser, schedule)) for the policy and, with a critic, the critic."""
        return {name: (model, self.optimizers[name]) for name, model in (("policy", self.policy), ("critic", self.critic))
                if model is not None}


def warmup_then_constant(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


def load_run(cfg, rank: int, world: int, device: torch.device, *, with_critic: bool,
             prm_adapters: dict | None, orm_adapter: Callable | None) -> Run:
    """Load (and shard) every model a PPO run needs, one at a time, and make the optimisers.

    `cfg` is ppo.Config. The critic is loaded only `with_critic`, the PRM only with `prm_adapters` (see
    `load_prm`), the ORM only with `orm_adapter`. Trained models (policy, critic) keep fp32 weights; under
    --precision bf16 they compute through FSDP2's bf16 mixed precision, at every world size, and the frozen ones
    (reference, PRM, ORM) are stored in bf16: the reference then holds the same numbers the policy's bf16
    all-gather gives, so KL is exactly 0 at the first step. Under fp32 everything is fp32, sharded only on
    several ranks. Each model is sharded and moved before the next is loaded, so host memory never holds two
    unsharded models.
    """
    sharded = dist.is_initialized()  # several ranks, or one under --precision bf16
    mixed = cfg.precision == "bf16"
    frozen_dtype = torch.bfloat16 if mixed else torch.float32
    load_device = torch.device("cpu") if sharded else device

    def place(model: nn.Module, trained: bool) -> nn.Module:
        if trained and cfg.gradient_checkpointing:
            (model.backbone if isinstance(model, Critic) else model).activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        if sharded:
            shard(model, trained=trained, mixed=mixed)
        return model.to(device)

    remote = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.model, "--model", remote)
    policy = place(load_model(cfg.model, flag="--model", device=load_device, trust_remote_code=remote), trained=True)
    critic = None
    if with_critic:
        critic = place(Critic.load(cfg.critic or cfg.model, flag="--critic" if cfg.critic else "--model",
                                   device=load_device, trust_remote_code=remote), trained=True)
    reference = place(load_model(cfg.model, flag="--model", dtype=frozen_dtype, device=load_device,
                                 trust_remote_code=remote).requires_grad_(False), trained=False)
    prm = orm = None
    if prm_adapters is not None:
        prm = load_prm(cfg.prm, prm_adapters, prm_format=cfg.prm_format, revision=cfg.prm_revision,
                       trust_remote_code=remote, dtype=frozen_dtype, device=load_device)
    if orm_adapter is not None:
        orm = load_orm(cfg.orm, orm_adapter, trust_remote_code=remote, dtype=frozen_dtype, device=load_device)
    for scorer in (prm, orm):
        if isinstance(getattr(scorer, "model", None), nn.Module):
            scorer.model = place(scorer.model, trained=False)
    optimizers = {}
    for name, model, lr in (("policy", policy, cfg.policy_lr), ("critic", critic, cfg.critic_lr)):
        if model is not None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            optimizers[name] = (optimizer, warmup_then_constant(optimizer, cfg.warmup_steps))
    return Run(policy=policy, reference=reference, critic=critic, tokenizer=tokenizer, prm=prm, orm=orm,
               optimizers=optimizers, device=device, rank=rank, world=world,
               stop_ids=stop_token_ids(policy, tokenizer))


# -------------------------------------------------------------------------------------------------
# Tiny models for the `tiny` preset and the tests
# -------------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer pattern: punctuation runs absorb the newlines after them, so ".\n\n" becomes one
# token as in the real tokenizer (the hazard that step-end mapping must survive).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STEP_TAG = "ки"
PRM_SEPARATOR = "<extra_0>"

_TINY_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Step 1: We have 3 + 4 = 7.\n\nStep 2: Then 7 × 2 = 14.\n\nThe answer is \\boxed{14}.",
    "First, compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}.\n\nSo the answer is \\boxed{\\frac{5}{6}}.",
    "Let x be the number of apples. Then 2x + 3 = 11, so x = 4.\n\nTherefore \\boxed{4}.",
    "The area of a circle is \\pi r^2 — with r = 3 it is 9\\pi.\n\n\\boxed{9\\pi}",
    "What is 12 - 5?\nNatalia sold 48 clips in April, and half as many in May. How many clips in total?",
    "√16 = 4 and 4² = 16. The angle is 90°.\n\nHence \\boxed{4}.",
    "We get (1, 2] ∪ [3, 4).\n\n\\boxed{(1,2]}",
]


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few KB of math text, with Qwen2's splitting and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_qwen2_config(vocab_size: int, **overrides):
    from transformers import Qwen2Config

    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


def build_tiny(out_dir: str | Path, seed: int = 0, **config_overrides) -> dict[str, Path]:
    """Write tiny random models with their tokenizers into `out_dir`; returns {name: folder}.

    - `policy`: Qwen2ForCausalLM. Its generation_config carries Qwen's sampling defaults (top_k 40, top_p 0.7,
      repetition penalty 1.1) and two eos ids, so code that forgets to override them is caught.
    - `step_tag_prm`: Qwen2ForCausalLM whose tokenizer has the Math-Shepherd step tag `ки` as one token.
    - `token_classifier_prm`: Qwen2ForTokenClassification (2 labels) with the `<extra_0>` separator, the
      Qwen2.5-Math-PRM format.
    - `orm`: Qwen2ForSequenceClassification with one label.
    Folders that already exist are reused (the same seed gives the same weights).
    """
    out_dir = Path(out_dir)
    names = ["policy", "step_tag_prm", "token_classifier_prm", "orm"]
    paths = {name: out_dir / name for name in names}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths

    with torch.random.fork_rng():  # seeded here without touching the caller's random stream
        torch.manual_seed(seed)
        _write_tiny(paths, **config_overrides)
    (out_dir / "tiny.json").write_text(json.dumps({"seed": seed, **config_overrides}))
    return paths


def _write_tiny(paths: dict[str, Path], **config_overrides) -> None:
    from transformers import (
        GenerationConfig, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2ForTokenClassification,
    )

    tokenizer = build_tiny_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def save(name, model, tok):
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(paths[name], safe_serialization=True)
        tok.save_pretrained(paths[name])

    policy = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer), eos_token_id=eos, pad_token_id=pad, **config_overrides))
    policy.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad,
        do_sample=True, temperature=0.7, top_k=40, top_p=0.7, repetition_penalty=1.1,
    )
    save("policy", policy, tokenizer)

    tag_tok = build_tiny_tokenizer()
    tag_tok.add_tokens([STEP_TAG])
    save("step_tag_prm", Qwen2ForCausalLM(tiny_qwen2_config(len(tag_tok), **config_overrides)), tag_tok)

    sep_tok = build_tiny_tokenizer()
    sep_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", PRM_SEPARATOR]})
    save("token_classifier_prm",
         Qwen2ForTokenClassification(tiny_qwen2_config(len(sep_tok), num_labels=2, **config_overrides)), sep_tok)

    orm = Qwen2ForSequenceClassification(tiny_qwen2_config(len(tokenizer), num_labels=1, **config_overrides))
    save("orm", orm, tokenizer)


def default_cache_dir() -> Path:
    """Where locally built models are cached: $PRM_PPO_CACHE, else ~/.cache/prm-ppo."""
    return Path(os.environ.get("PRM_PPO_CACHE", Path.home() / ".cache" / "prm-ppo"))


# -------------------------------------------------------------------------------------------------
# torch.distributed, FSDP2 sharding, generation with gathered weights, HF export
# -------------------------------------------------------------------------------------------------


def default_precision() -> str:
    """What --precision means when not given: bf16 on CUDA (what a GPU run does), fp32 on CPU."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def init_distributed(precision: str = "fp32") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on GPU, gloo on CPU. Alone under bf16: a one-rank process
    group on an in-process store (it binds no port, so two runs can start at once), because bf16 runs the FSDP2
    path at every world size. Alone under fp32: no process group, rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if precision == "bf16":
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        return 0, 1, device
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def end_distributed() -> None:
    """End a torchrun worker: wait for every rank, destroy the process group, flush, and exit with status 0
    without Python's interpreter finalisation. A no-op in a single process (nothing to end).

    Why not a plain return: after `destroy_process_group` gloo's C++ backend stays referenced from C++ once
    FSDP2 has used it, so its worker threads live on into interpreter finalisation. A worker thread that
    drops its last reference to a finished collective's tensors (e.g. an export all-gather's) must take the
    GIL to free their Python objects; during finalisation that ends the thread with pthread_exit inside a
    noexcept destructor, so the rank dies with "terminate called without an active exception" (SIGABRT)
    at random, more often on a loaded machine. `os._exit` ends all threads at once, before that can happen.
    Call it last: atexit handlers do not run after it (close files and pools before).
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks, on the device the backend needs (NCCL: the GPU); returns x's device. A no-op in
    a single process."""
    if not dist.is_initialized():
        return x
    y = x.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(model: nn.Module, *, trained: bool, mixed: bool) -> None:
    """FSDP2 (`fully_shard`) on every decoder layer, then on the root.

    `mixed` (--precision bf16) with `trained`: the sharded master weights stay fp32 and the forward gathers them
    in bf16, gradients reduce-scatter in fp32 (a critic's value head stays fp32 throughout). Frozen models get
    no policy: they were loaded in the dtype they compute in. A causal LM gets `response_head` (see
    `response_logprobs`) registered as an FSDP forward method, so its LM head runs inside the root's forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mp = bf16 if trained and mixed else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mp_policy=mp)
        if isinstance(module, ValueHead):
            fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    fully_shard(model, mp_policy=mp)
    if isinstance(model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None, nn.Module):
        model.response_head = types.MethodType(_response_head, model)
        register_fsdp_forward_method(model, "response_head")


def reshard(model: nn.Module | None) -> None:
    """Free the gathered parameters an FSDP2 root keeps after a forward (it expects a backward, which a no-grad
    forward never has): called after scoring, so no phase carries a gathered embedding and LM head (GBs per rank
    at 7B) into the next. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


class gathered:
    """Context manager: all-gather an FSDP2 model's weights once, keep them for many forwards, reshard.

    Plain `generate` on a sharded model all-gathers every layer at every new token; here reshard-after-forward
    is switched off and every FSDP module is unsharded once, so a whole rollout costs one all-gather per
    module. A no-op for a model that is not sharded.
    """

    def __init__(self, model: nn.Module | None):
        from torch.distributed.fsdp import FSDPModule

        modules = model.modules() if isinstance(model, nn.Module) else []  # e.g. a rule-based PRM: nothing to do
        self.modules = [m for m in modules if isinstance(m, FSDPModule)]
        self.root = model

    def __enter__(self):
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module in self.modules:
            module.unshard()
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.reshard()
            # FSDP2's defaults: layers reshard after forward, the root keeps its (small) parameters for backward.
            module.set_reshard_after_forward(module is not self.root, recurse=False)
        return False


def export_hf(model: nn.Module, tokenizer, folder: str | Path, rank: int = 0,
              dtype: torch.dtype = torch.float32) -> None:
    """Save the (possibly sharded) policy or critic as an HF folder of safetensors that `from_pretrained`
    (the critic: `Critic.load`, i.e. `--critic`) loads, its floating-point weights in `dtype` (bf16 under
    --precision bf16, as the model computed).

    Every rank takes part in gathering the full state dict; rank 0 writes it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if rank == 0:
        if isinstance(model, Critic):  # backbone folder + value_head.safetensors: what --critic loads
            model.save(folder, state)
        else:
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
