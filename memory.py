"""A simulated memory plan of a PPO run: GiB per rank in each phase of a step, without a GPU.

    python ppo.py <a run's flags> --memory-plan 8        # what 8 GPUs would each hold; writes memory-plan.json

or from Python: `memory.plan(cfg, 8, with_critic=True, uses_prm=True, uses_orm=False)`, then `report` and `write`.

What is simulated. One CPU process stands in for rank 0 of `world` ranks: a fake process group (collectives do
nothing), FakeTensorMode (tensors have shapes and dtypes but no data, so a 7B model costs no memory), and the
models built from their configs alone (config.json; no weights are read or downloaded), placed exactly as
`models.load_run` places them: trained models (policy; critic = backbone + scalar value head) in fp32 with
activation checkpointing when the run has it, frozen ones (reference, PRM, ORM) in bf16 under --precision bf16
(fp32 under fp32), all sharded by `models.shard` (FSDP2 per decoder layer, then the root; bf16 mixed precision
for trained models under bf16). torch's MemTracker and FSDPMemTracker count every tensor's storage while the
run's own code runs on one micro-batch of the largest shape (prompt + response = --max-prompt-tokens +
--max-new-tokens columns):
- resident: what every phase holds: sharded weights, the trained models' AdamW moments, buffers;
- generation: resident + the policy gathered (`models.gathered`, in the compute dtype) + a prefill of
  --generation-batch-size prompts and one decode step against a KV cache of the full length (HF `generate`
  itself cannot run on fake tensors; the prefill and the last step are its two largest moments);
- scoring: resident + the no-grad forwards of `ppo.score_tokens` (policy, reference, critic: layer by layer,
  each root kept gathered until all are done) and of the PRM and ORM, each gathered whole, in their adapters'
  batches (rewards.StepTagPRM / TokenClassifierPRM: a token budget; SequenceORM: a number of rows);
- training: the larger of the policy's step (forward through the chunked fp32 head of
  `models.response_logprobs`, backward, gradient clipping, AdamW step) and the critic's, each with the other
  model's resident state and sharded gradients (held between micro-batches of one minibatch);
- peak: the largest phase.

What is left out: the CUDA context and kernels (~0.5-1 GiB per GPU), NCCL's buffers, the caching allocator's
rounding and fragmentation (plan on 10-20% headroom), flash-attn's unpadding copies (sdpa's fused kernel is
simulated), host memory, micro-batches of shorter rows (they hold about as many tokens), checkpoints and the
final export (`get_model_state_dict` gathers one parameter at a time to the CPU).

Checked by tests/test_memory.py against the same code on real, randomly initialised tensors over 2 gloo ranks
(every phase within 1% at a 6M-parameter shape) and against HF `generate` itself. gloo holds a reduce-scatter's
input (one FSDP module's fp32 gradients) in its work object until AdamW steps, where NCCL, like the fake process
group here, releases it when the collective completes: a step measured under gloo can read ~10% higher.
A plan of the 1.5B or 7B presets on 8 ranks takes ~30-40 s and ~450 MB of host memory.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import models
import rewards

GIB = 2 ** 30
PHASES = ("resident", "generation", "scoring", "training", "peak")


class Plan(dict):
    """{phase: GiB per rank} for the five PHASES (what `write` saves), with `notes` (lines for the reader) and
    `details` (what `report` shows: GiB per model, the KV cache, which forward or step is largest, seconds)."""

    def __init__(self, figures: dict[str, float], notes: list[str], details: dict[str, Any]):
        super().__init__(figures)
        self.notes = notes
        self.details = details


@dataclass
class Spec:
    """One model the run holds, as the simulation builds it."""

    role: str  # policy, critic, reference, prm, orm
    config: Any  # its transformers config
    auto_class: str  # the transformers Auto class that builds it (the critic: its backbone's)
    trained: bool
    kind: str = ""  # how a scorer is run: step_tag, token_classifier, sequence_classifier


# -------------------------------------------------------------------------------------------------
# The public API: plan, report, write
# -------------------------------------------------------------------------------------------------


def plan(cfg, world: int, *, with_critic: bool, uses_prm: bool, uses_orm: bool) -> Plan:
    """GiB per rank in each phase of a step of the run `cfg` (ppo.Config, read by field name) on `world` ranks:
    {"resident", "generation", "scoring", "training", "peak"}. `with_critic`: the --advantage estimator needs a
    critic; `uses_prm` / `uses_orm`: the reward uses the PRM / ORM. Must run before torch.distributed is
    initialised in this process (it makes its own fake process group, and destroys it at the end)."""
    validate(cfg, world)
    return simulate(cfg, world, with_critic=with_critic, uses_prm=uses_prm, uses_orm=uses_orm, fake=True)


def report(plan: Plan, cfg, world: int) -> str:
    """A few readable lines for the terminal: each phase, what it is made of, and the notes (in MiB when the
    whole plan is under 1 GiB)."""
    d = getattr(plan, "details", {})
    unit, scale = ("GiB", 1) if plan["peak"] >= 1 else ("MiB", 1024)
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    lines = [f"memory plan: {unit} per rank on {world} rank{'s' if world > 1 else ''}, --precision {cfg.precision}, "
             f"gradient checkpointing {checkpointing}, simulated ({d.get('seconds', 0):.0f} s)"]
    tokens = cfg.max_prompt_tokens + cfg.max_new_tokens
    parts = {
        "resident": ", ".join(f"{role} {gib * scale:.2f}" for role, gib in d.get("held", {}).items()),
        "generation": f"+ the policy gathered, a KV cache of {d.get('kv_cache', 0) * scale:.2f} "
                      f"({cfg.generation_batch_size} x {tokens} tokens), activations",
        "scoring": f"largest forward: {d.get('scoring_largest', '?')}",
        "training": ", ".join(f"{role} step {gib * scale:.2f}" for role, gib in d.get("steps", {}).items()),
        "peak": f"in {max(PHASES[:-1], key=lambda phase: plan[phase])}",
    }
    lines += [f"  {phase:<11}{plan[phase] * scale:8.2f}   {parts[phase]}" for phase in PHASES]
    lines += [f"  note: {note}" for note in plan.notes]
    lines.append("  left out: the CUDA context (~0.5-1 GiB), NCCL buffers, allocator fragmentation: keep 10-20% free")
    return "\n".join(lines)


def write(plan: dict, output_dir: str | Path) -> Path:
    """Write `<output_dir>/memory-plan.json`: exactly {"resident", "generation", "scoring", "training", "peak"}
    in GiB per rank. Returns its path."""
    path = Path(output_dir) / "memory-plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({phase: round(float(plan[phase]), 6) for phase in PHASES}, indent=1) + "\n")
    return path


def validate(cfg, world: int) -> None:
    """The checks `plan` makes before anything is built, as one-line exits naming the flag."""
    if not isinstance(world, int) or world < 1:
        raise SystemExit(f"--memory-plan {world}: the number of ranks must be a whole number >= 1")
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--memory-plan {world}: --prompts-per-step {cfg.prompts_per_step} does not divide over "
                         f"{world} ranks")
    if cfg.precision not in ("bf16", "fp32"):
        raise SystemExit(f"--precision: unknown '{cfg.precision}'; choose one of bf16, fp32")


# -------------------------------------------------------------------------------------------------
# Which models a run holds, from their configs
# -------------------------------------------------------------------------------------------------


def model_specs(cfg, *, with_critic: bool, uses_prm: bool, uses_orm: bool) -> tuple[list[Spec], list[str]]:
    """The models the run holds, from their configs only, and notes on what was left out or approximated."""
    notes: list[str] = []
    policy = models.load_config(cfg.model, "--model")
    specs = [Spec("policy", policy, "AutoModelForCausalLM", trained=True)]
    if with_critic:
        critic = models.load_config(cfg.critic, "--critic") if cfg.critic else policy
        specs.append(Spec("critic", critic, "AutoModel", trained=True))
    specs.append(Spec("reference", policy, "AutoModelForCausalLM", trained=False))
    if uses_prm and cfg.prm != "none":
        specs += _prm_spec(cfg, notes)
    if uses_orm and cfg.orm != "none":
        config = _scorer_config(cfg.orm, "--orm", None, notes)
        if config is not None:
            config = copy.deepcopy(config)
            if getattr(config, "pad_token_id", None) is None:  # sequence classifiers find each row's end by it
                config.pad_token_id = 0
            specs += _buildable(Spec("orm", config, "AutoModelForSequenceClassification", False,
                                     "sequence_classifier"), "--orm", cfg.orm, notes)
    return specs, notes


def _prm_spec(cfg, notes: list[str]) -> list[Spec]:
    """[the PRM's Spec], or [] with a note for a `module:function` PRM or one whose config needs hub code."""
    if ":" in cfg.prm and not Path(cfg.prm).exists():
        notes.append(f"--prm {cfg.prm} is a Python function, not a model: it counts 0 GiB")
        return []
    config = _scorer_config(cfg.prm, "--prm", getattr(cfg, "prm_revision", None), notes)
    if config is None:
        return []
    kind = models.prm_format_of(config) if cfg.prm_format == "auto" else cfg.prm_format
    auto_class = "AutoModelForCausalLM" if kind == "step_tag" else "AutoModelForTokenClassification"
    return _buildable(Spec("prm", config, auto_class, False, kind), "--prm", cfg.prm, notes)


def _scorer_config(name: str, flag: str, revision: str | None, notes: list[str]):
    """A PRM's or ORM's config, never running hub code: None (with a note) when it cannot be read without."""
    try:
        return models.load_config(name, flag, revision=revision)
    except SystemExit as err:
        if not any(sign in str(err) for sign in ("custom code", "trust_remote_code")):
            raise
        notes.append(f"{flag} {name}: its config needs code from the hub, which a memory plan never runs: "
                     "left out (0 GiB)")
        return None


def _buildable(spec: Spec, flag: str, name: str, notes: list[str]) -> list[Spec]:
    """[spec] when transformers can build it from its config alone; a config with its own (hub) classes is sized
    as transformers' class for its model_type, with a note; [] with a note when transformers has none."""
    import transformers

    remote = bool(getattr(spec.config, "auto_map", None))
    if remote:
        spec.config = copy.deepcopy(spec.config)
        del spec.config.auto_map  # built from the model_type's classes, never the hub's code
    try:
        known = type(spec.config) in getattr(transformers, spec.auto_class)._model_mapping
    except (AttributeError, KeyError):
        known = True  # no mapping to ask: let the build decide
    if not known:
        notes.append(f"{flag} {name}: transformers has no {spec.auto_class} for model_type "
                     f"'{spec.config.model_type}': left out (0 GiB)")
        return []
    if remote:
        notes.append(f"{flag} {name} has its own model code (auto_map): sized as transformers' {spec.auto_class} "
                     f"of model_type '{spec.config.model_type}' (its own head may differ slightly)")
    return [spec]


# -------------------------------------------------------------------------------------------------
# The simulation
# -------------------------------------------------------------------------------------------------


def simulate(cfg, world: int, *, with_critic: bool, uses_prm: bool, uses_orm: bool, fake: bool = True) -> Plan:
    """`plan` without its checks. fake=False builds real, randomly initialised tensors in the process group that
    is already initialised (e.g. gloo under torch.distributed.run), on the same code path: what tests compare."""
    start = time.perf_counter()
    specs, notes = model_specs(cfg, with_critic=with_critic, uses_prm=uses_prm, uses_orm=uses_orm)
    sharded = world > 1 or cfg.precision == "bf16"  # as models.load_run: one fp32 rank has no process group
    world_ctx = _fake_world(world) if fake else contextlib.nullcontext()
    tensors = _fake_tensors() if fake else contextlib.nullcontext()
    with world_ctx, tensors, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2's and the trackers' warnings about what is only simulated here
        build = {spec.role: (lambda spec=spec: _build(spec, cfg, sharded, fake)) for spec in specs}
        policy = build["policy"]()
        generation, kv_cache = _generation(policy, specs[0].config, cfg)
        del policy
        scorers = {role: make() for role, make in build.items()}
        kinds = {spec.role: spec.kind for spec in specs}
        scoring, largest = _scoring(scorers, kinds, cfg)
        held = {role: _held_bytes(model) for role, model in scorers.items()}
        del scorers
        steps = {spec.role: _training(build[spec.role](), spec.role, cfg) for spec in specs if spec.trained}
    for role, step in steps.items():  # now with their AdamW moments, which scoring's fresh copies lacked
        held[role] = step["held"]
    resident = sum(held.values())
    training = {role: resident - step["held"] + step["peak"] +
                sum(other["grads"] for other_role, other in steps.items() if other_role != role)
                for role, step in steps.items()}
    figures = {"resident": resident, "generation": resident + generation, "scoring": resident + scoring,
               "training": max(training.values())}
    figures = {phase: value / GIB for phase, value in figures.items()}
    figures["peak"] = max(figures.values())
    details = {"held": {role: b / GIB for role, b in held.items()}, "kv_cache": kv_cache / GIB,
               "scoring_largest": largest, "steps": {role: b / GIB for role, b in training.items()},
               "seconds": time.perf_counter() - start, "world": world}
    if world == 1 and not sharded:
        notes.append("one rank under fp32: nothing is sharded, as in the run")
    return Plan(figures, notes, details)


@contextlib.contextmanager
def _fake_world(world: int):
    """A fake process group of `world` ranks for this process (rank 0); collectives do nothing. Destroyed on
    exit, so the simulation can run again in the same process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("memory.plan makes its own fake process group: call it before torch.distributed is "
                           "initialised (or use simulate(..., fake=False) inside a real one)")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _build(spec: Spec, cfg, sharded: bool, fake: bool) -> nn.Module:
    """One model as the run places it (see the module docstring), from its config: fake tensors under
    FakeTensorMode, random weights otherwise."""
    import transformers

    dtype = torch.float32 if spec.trained or cfg.precision == "fp32" else torch.bfloat16
    cls = getattr(transformers, spec.auto_class)
    model = cls.from_config(spec.config, dtype=dtype)
    if spec.role == "critic":
        model = models.Critic(model)
    models.disable_dropout(model)
    # Frozen models keep requires_grad here (the run turns it off): they only run under no_grad, where it changes
    # nothing, and MemTracker hooks every parameter it sees, which a tensor without requires_grad refuses.
    if spec.trained and cfg.gradient_checkpointing:
        (model.backbone if spec.role == "critic" else model).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        # The device mesh fully_shard makes is a real tensor: made outside FakeTensorMode; the parameters stay fake.
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily() if fake else contextlib.nullcontext():
            models.shard(model, trained=spec.trained, mixed=cfg.precision == "bf16")
    return model


def _held_bytes(*objects) -> int:
    """Bytes of the distinct storages held by modules (parameters, gradients, buffers), optimisers (state) and
    tensors; a freed FSDP2 storage (resized to 0) counts 0."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    tensors: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors += [p for p in obj.parameters()] + [p.grad for p in obj.parameters() if p.grad is not None]
            tensors += list(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, torch.Tensor):
            tensors.append(obj)
    storages = {id(st): st for t in tensors for st in get_untyped_storages(t)}
    return sum(st.nbytes() for st in storages.values())


def _tracker(kind: str, *args):
    """torch's MemTracker ("mem") or FSDPMemTracker ("fsdp") keeping only the global peak: their per-module
    statistics, which the plan does not use, cost time proportional to the modules seen at every operation
    (scoring at the 1.5B shape: 27 s with them, 3 s without)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakOnly(FSDPMemTracker if kind == "fsdp" else MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakOnly(*args)


def _peak_over(tracker, base: int) -> int:
    """The tracker's peak total (all devices) minus `base`."""
    return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()) - base


def _current(tracker) -> int:
    return sum(snap["Total"] for snap in tracker.get_tracker_snapshot().values())


def _micro_batch(rows: int, prompt: int, response: int) -> data.MicroBatch:
    """`rows` rows of `prompt` + `response` tokens, unpadded: the shape of the largest micro-batch."""
    width = prompt + response
    ids = torch.zeros(rows, width, dtype=torch.long)
    return data.MicroBatch(rows=list(range(rows)), input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(width).expand(rows, width).contiguous(), prompt_width=prompt)


def _rows(cfg) -> int:
    """Rows of the largest micro-batch: --micro-batch-tokens over the longest row, at least one."""
    return max(1, cfg.micro_batch_tokens // (cfg.max_prompt_tokens + cfg.max_new_tokens))


# -------------------------------------------------------------------------------------------------
# The phases: each returns bytes over the resident state (training: the step's whole peak)
# -------------------------------------------------------------------------------------------------


def _generation(policy: nn.Module, config, cfg) -> tuple[int, int]:
    """(bytes over the resident state, KV cache bytes) of a rollout batch: the policy gathered as `ppo.sample`
    gathers it, a prefill of --generation-batch-size prompts of --max-prompt-tokens, the cache grown to the full
    length, one decode step with sampling from the last logits (as HF generate computes them)."""
    from transformers import DynamicCache

    G, P, N = cfg.generation_batch_size, cfg.max_prompt_tokens, cfg.max_new_tokens
    policy.eval()
    tracker = _tracker("mem")
    tracker.track_external(policy)
    base = _current(tracker)
    name = "cache" if "cache" in inspect.signature(policy.forward).parameters else "past_key_values"
    with tracker, torch.no_grad(), models.gathered(policy):
        cache = DynamicCache(config=config)
        _sample_step(policy, torch.zeros(G, P, dtype=torch.long), {name: cache}, cfg.temperature)
        tracker.reset_mod_stats()  # the same modules run again: a new "iteration" for the tracker
        for i, layer in enumerate(cache.layers if N > 1 else []):  # the rest of the response's keys and values
            k, v = layer.keys, layer.values
            cache.update(k.new_zeros(*k.shape[:-2], N - 1, k.shape[-1]), v.new_zeros(*v.shape[:-2], N - 1, v.shape[-1]),
                         i)
        _sample_step(policy, torch.zeros(G, 1, dtype=torch.long), {name: cache}, cfg.temperature)
        kv_cache = _held_bytes(*[t for layer in cache.layers for t in (layer.keys, layer.values)])
        del cache
    return _peak_over(tracker, base), kv_cache


def _sample_step(model: nn.Module, ids: torch.Tensor, cache: dict, temperature: float) -> None:
    """One forward of generation (last position's logits only, as HF generate asks) and the sampling
    distribution made from them in fp32."""
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache).logits
    probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
    del logits, probs


def _scoring(scorers: dict[str, nn.Module], kinds: dict[str, str], cfg) -> tuple[int, str]:
    """(bytes over the resident state, which forward is largest) of `ppo.score_tokens` and `ppo.grade` on one
    micro-batch: policy and reference log-probs and critic values (FSDP2 forwards; each root stays gathered
    until all are done), then the PRM and the ORM, each gathered whole by `models.gathered`."""
    tracker = _tracker("mem")
    tracker.track_external(*scorers.values())
    base = _current(tracker)
    P, N = cfg.max_prompt_tokens, cfg.max_new_tokens
    raised = {}  # forward -> the peak after it
    with tracker, torch.no_grad():
        mb = _micro_batch(_rows(cfg), P, N)
        for role in ("policy", "reference", "critic"):
            if role in scorers:
                model = scorers[role].eval()
                if role == "critic":  # the output is dropped at once, as score_tokens keeps only a CPU copy
                    models.response_values(model, mb)
                else:
                    models.response_logprobs(model, mb, cfg.temperature)
                raised[role] = _peak_over(tracker, base)
        for role in ("policy", "reference", "critic"):
            models.reshard(scorers.get(role))
        del mb
        for role in ("prm", "orm"):
            if role in scorers:
                with models.gathered(scorers[role].eval()):
                    _scorer_forward(scorers[role], kinds[role], cfg)
                raised[f"{role} (gathered whole)"] = _peak_over(tracker, base)
    largest = min((peak, i, role) for i, (role, peak) in enumerate(raised.items()) if peak == max(raised.values()))
    return _peak_over(tracker, base), largest[2]


def _scorer_forward(model: nn.Module, kind: str, cfg) -> None:
    """A PRM's or ORM's forward on one of its adapter's batches of prompt + response rows: a step-tag PRM runs
    its backbone and two rows of its LM head (rewards.StepTagPRM), a classifier its whole forward."""
    width = cfg.max_prompt_tokens + cfg.max_new_tokens
    if kind == "sequence_classifier":
        rows = _default(rewards.SequenceORM, "batch_size", _rows(cfg))
    else:
        adapter = rewards.StepTagPRM if kind == "step_tag" else rewards.TokenClassifierPRM
        rows = max(1, _default(adapter, "batch_tokens", cfg.micro_batch_tokens) // width)
    ids = torch.zeros(rows, width, dtype=torch.long)
    if kind == "step_tag":  # the adapter's own head: one tag per row here, at its end
        padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        scores = rewards.tag_logits(model, padded, [(row, width - 1) for row in range(rows)], [0, 1]).float()
        scores = scores.softmax(-1)
    else:
        position_ids = torch.arange(width).expand(rows, width).contiguous()
        scores = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits.float()
    del scores


def _default(cls, name: str, fallback: int) -> int:
    """The default of `cls(...)`'s argument `name` (an adapter's batch size), or `fallback`."""
    try:
        value = inspect.signature(cls).parameters[name].default
    except (KeyError, TypeError, ValueError):
        return fallback
    return value if isinstance(value, int) else fallback


def _training(model: nn.Module, role: str, cfg) -> dict[str, int]:
    """{peak, held, grads} in bytes of one optimiser step of the policy or critic on one micro-batch: the
    tracker's peak (this model's own state included), what it holds between steps (sharded weights, AdamW
    moments, buffers) and its sharded gradients."""
    from torch.distributed.fsdp import FSDPModule

    # foreach, as on CUDA (on CPU torch would default to the per-tensor loop, which holds fewer temporaries)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, foreach=True)
    mb = _micro_batch(_rows(cfg), cfg.max_prompt_tokens, cfg.max_new_tokens)
    inputs = (mb.input_ids, mb.attention_mask, mb.position_ids)
    model.train()
    _warm_up(model, optimizer)
    if isinstance(model, FSDPModule):
        tracker = _tracker("fsdp", model, optimizer)
        tracker.track_inputs(inputs)
    else:
        tracker = _tracker("mem")
        tracker.track_external(model, optimizer, *inputs)
    with tracker:
        grads = _train_step(model, role, mb, optimizer, cfg)
    return {"peak": _peak_over(tracker, 0), "held": _held_bytes(model, optimizer), "grads": grads}


def _warm_up(model: nn.Module, optimizer) -> None:
    """An untracked clipping and AdamW step on zero gradients: it makes the AdamW moments, as a run's first step
    does, and DTensor's first sharding propagations, which under FakeTensorMode allocate full-size fake tensors
    that a tracker would count (measured: the first step's peak 2.2x the real one, later steps equal)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_step(model: nn.Module, role: str, mb: data.MicroBatch, optimizer, cfg) -> int:
    """Forward and backward of the run's objective's graph (the policy: the sum of the response log-probs,
    entropy too, as `ppo.backward_micro_batch` computes them; the critic: the sum of its values), then
    `ppo.optimizer_step`: clipping, AdamW, gradients freed. Returns the gradients' bytes before they are freed."""
    if role == "critic":
        loss = models.response_values(model, mb).sum()
    else:
        head = getattr(model, "response_head", None)
        inner = getattr(head, "__wrapped__", None)  # models.shard registers it as an FSDP2 forward method
        if inner is None:
            logp, _ = models.response_logprobs(model, mb, cfg.temperature, with_entropy=True)
        else:
            # Called as the root's forward, so FSDPMemTracker sees the root's hooks (it wraps only forward's).
            model.forward = inner
            try:
                logp, _ = model(mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_width, cfg.temperature,
                                True)
            finally:
                del model.forward
        loss = logp.sum()
    loss.backward()
    grads = _held_bytes(*[p.grad for p in model.parameters() if p.grad is not None])
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads
