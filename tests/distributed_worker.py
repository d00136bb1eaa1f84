"""Worker for tests/test_distributed.py, run under `torch.distributed.run` (or alone as the 1-process reference).

    python tests/distributed_worker.py update ROLLOUT OUT.json --reward prm --cache-dir DIR
        train_on_rollout on this rank's share of a saved rollout (split on group boundaries) under every
        estimator; rank 0 writes the metrics and a fingerprint of the updated policy (and critic) of each.
    python tests/distributed_worker.py generate OUT.json --cache-dir DIR
        generation under FSDP2 vs the same model unsharded, and the all-gathers counted per rollout.
    python tests/distributed_worker.py score OUT.json --cache-dir DIR
        one rollout, then whether every model's parameters are sharded again.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import models  # noqa: E402
import ppo  # noqa: E402

torch.set_num_threads(1)


def rank_share(saved: dict, rank: int, world: int) -> ppo.Rollout:
    """Rows [rank * B / world, (rank + 1) * B / world) of every per-response list and tensor of a saved rollout."""
    B = len(saved["response_ids"])
    lo, hi = rank * B // world, (rank + 1) * B // world
    return ppo.Rollout(**{k: (v[lo:hi] if isinstance(v, (list, torch.Tensor)) else v) for k, v in saved.items()})


def fingerprint(model) -> dict[str, float]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: float(v.double().sum()) for k, v in sorted(state.items())}


def update(rollout_path: str, out: str, reward: str, cache_dir: str, extra: list[str]) -> None:
    """One update per estimator in ppo.ESTIMATORS, each from the same initial models and saved rollout."""
    rank, world, device = models.init_distributed("bf16" if "bf16" in extra else "fp32")  # bf16: FSDP2 on 1 rank too
    results = {}
    for advantage in ppo.ESTIMATORS:
        cfg = ppo.parse_config(["--preset", "tiny", "--reward", reward, "--cache-dir", cache_dir, "--ppo-epochs", "2",
                                "--ppo-minibatches", "1", "--micro-batch-tokens", "64", "--prm", "none",
                                "--advantage", advantage, *extra])
        ppo.resolve_local_models(cfg, rank)
        run = ppo.setup(cfg, rank, world, device)
        ro = rank_share(torch.load(rollout_path, weights_only=True), rank, world)
        metrics = ppo.train_on_rollout(cfg, 1, ro, run)
        results[advantage] = {"metrics": metrics, **{name: fingerprint(model) for name, (model, _) in run.trained().items()}}
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def generate(out: str, cache_dir: str) -> None:
    rank, world, device = models.init_distributed()
    paths = models.build_tiny(Path(cache_dir) / "tiny") if rank == 0 else None
    dist.barrier()
    paths = paths or models.build_tiny(Path(cache_dir) / "tiny")
    tokenizer = models.load_tokenizer(str(paths["policy"]))
    plain = models.load_model(str(paths["policy"]))
    sharded = models.load_model(str(paths["policy"]))
    models.shard(sharded, trained=True, mixed=False)
    prompts = [tokenizer.encode(t) for t in ["What is 3 + 4?", "Compute 12 - 5.", "x"]]
    kwargs = dict(pad_id=tokenizer.pad_token_id, stop_ids=[], temperature=1.0)

    # Count the collectives FSDP2 all-gathers with (its name differs across torch versions).
    gathers = {"n": 0}
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)}

    def counting(real):
        def wrapper(*args, **kw):
            gathers["n"] += 1
            return real(*args, **kw)
        return wrapper

    for name, real in originals.items():
        setattr(dist, name, counting(real))
    result = {}
    for new_tokens in (4, 16):
        torch.manual_seed(1234 + rank)
        expected = models.generate(plain, prompts, max_new_tokens=new_tokens, **kwargs)
        torch.manual_seed(1234 + rank)
        gathers["n"] = 0
        with models.gathered(sharded):
            got = models.generate(sharded, prompts, max_new_tokens=new_tokens, **kwargs)
        result[f"gathers_{new_tokens}"] = gathers["n"]
        result[f"same_{new_tokens}"] = got == expected
        result[f"tokens_{new_tokens}"] = sum(map(len, got))
    gathers["n"] = 0
    torch.manual_seed(1234 + rank)
    models.generate(sharded, prompts, max_new_tokens=16, **kwargs)  # without `gathered`: per token
    result["gathers_16_plain_generate"] = gathers["n"]
    for name, real in originals.items():
        setattr(dist, name, real)
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        Path(out).write_text(json.dumps(every))


def score(out: str, cache_dir: str) -> None:
    """One rollout (sample, score_tokens, grade) on 2 ranks; then, for each model, whether every parameter of
    every FSDP module is a sharded DTensor again (an FSDP2 root keeps its gathered parameters after a forward,
    expecting a backward that a no-grad forward never has)."""
    from torch.distributed.tensor import DTensor

    import data

    rank, world, device = models.init_distributed()
    cfg = ppo.parse_config(["--preset", "tiny", "--reward", "prm", "--cache-dir", cache_dir, "--max-new-tokens", "8"])
    ppo.resolve_local_models(cfg, rank)
    run = ppo.setup(cfg, rank, world, device)
    run.checker = lambda texts, golds: [False] * len(texts)
    problems, _ = data.tokenize_prompts(run.tokenizer, data.tiny_problems(seed=0), 256)
    ro = ppo.rollout(cfg, problems[rank * 2:rank * 2 + 2], run)
    result = {name: all(isinstance(p, DTensor) for p in model.parameters())
              for name, model in (("policy", run.policy), ("reference", run.reference), ("critic", run.critic),
                                  ("prm", run.prm.model))}
    result["scored"] = bool(ro.old_logp.abs().sum() > 0) and any(ro.step_scores)
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        Path(out).write_text(json.dumps(every))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["update", "generate", "score"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--reward", default="prm")
    parser.add_argument("--cache-dir", required=True)
    args, extra = parser.parse_known_args()  # the rest goes to ppo's config
    if args.command == "update":
        update(*args.paths, args.reward, args.cache_dir, extra)
    elif args.command == "score":
        score(*args.paths, args.cache_dir)
    else:
        generate(*args.paths, args.cache_dir)
    models.end_distributed()
