"""Distributed runs on CPU: 2 gloo ranks under torch.distributed.run, compared with one process.

Sampling is seeded per rank, so whole runs differ by design; the update is compared on the same saved rollout,
generation on the same prompts and seed, sharded vs unsharded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import ppo

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
REPO = WORKER.parent.parent


def launch(args: list[str], nproc: int | None, timeout: int = 300) -> None:
    """Run a script alone (nproc None) or under torch.distributed.run with `nproc` gloo ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    prefix = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    done = subprocess.run(prefix + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist_cache"))


@pytest.fixture(scope="module")
def saved_rollout(cache_dir, tmp_path_factory):
    """One scored tiny rollout (8 responses with PRM step scores), saved like a checkpoint tensor file."""
    cfg = ppo.parse_config(["--preset", "tiny", "--cache-dir", cache_dir, "--reward", "prm",
                            "--samples-per-prompt", "2", "--prompts-per-step", "4", "--max-new-tokens", "24"])
    ppo.resolve_local_models(cfg, 0)
    torch.manual_seed(0)
    run = ppo.setup(cfg, 0, 1, torch.device("cpu"))
    run.checker = lambda texts, golds: [False] * len(texts)
    import data

    problems, _ = data.tokenize_prompts(run.tokenizer, data.tiny_problems(seed=0), 256)
    ro = ppo.rollout(cfg, problems[:4], run)
    # Some successes; group 0 (rows 0, 1) has unequal outcomes, group 3 (rows 6, 7) equal ones.
    ro.success = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]) * (~ro.truncated).float()
    assert ro.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 4 rows per rank: groups stay on one rank
    assert any(len(s) > 1 for s in ro.step_scores)
    path = tmp_path_factory.mktemp("rollout") / "rollout.pt"
    torch.save(vars(ro), path)  # a plain dict: loads with weights_only=True
    return path


# Tolerance (relative): 1e-4 for metrics, 1e-5 for weight sums, for fp32 and bf16 alike: the same sums in a different
# order (micro-batches, ranks) in fp32. Under bf16 the log-probs are bitwise those of one process (CPU bf16 does not
# depend on the batch shape), and with --micro-batch-tokens 64 each backward holds one row, so every bf16 gradient
# is the same on 1 and 2 ranks before the fp32 reduce-scatter. (Measured: bf16 passes at 1e-6 / 1e-7 too; with
# several rows per backward, the gradients' bf16 rounding would differ by row grouping, a few 2^-8.)
@pytest.mark.parametrize("reward,extra", [
    ("prm", []),
    ("clip_delta", ["--gradient-checkpointing", "--loss-agg", "seq-mean-token-mean", "--kl-in", "loss",
                    "--kl-estimator", "k2"]),
    ("clip_delta", ["--precision", "bf16"])])
def test_update_with_two_ranks_equals_one_process_for_every_estimator(saved_rollout, cache_dir, tmp_path, reward, extra):
    args = ["tests/distributed_worker.py", "update", str(saved_rollout), "{out}", "--reward", reward, "--cache-dir", cache_dir,
            *extra]
    results = {}
    for name, nproc in (("single", None), ("two_ranks", 2)):
        out = tmp_path / f"{name}.json"
        launch([a.format(out=out) for a in args], nproc)
        results[name] = json.loads(out.read_text())
    assert list(results["single"]) == list(ppo.ESTIMATORS)
    for advantage in ppo.ESTIMATORS:
        single, double = results["single"][advantage], results["two_ranks"][advantage]
        keys = ["loss/policy", "policy/grad_norm", "reward/process", "reward/total", "policy/clip_frac",
                "policy/approx_kl", "advantage/equal_outcome_groups"]
        keys += ["loss/value", "value/grad_norm"] if ppo.ESTIMATORS[advantage].needs_critic else []
        assert single["metrics"].keys() == double["metrics"].keys()
        for key in keys:
            assert double["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), (
                advantage, key)
        assert single["metrics"]["loss/policy"] != 0.0 and single["metrics"]["policy/grad_norm"] > 0
        assert ("critic" in single) == ppo.ESTIMATORS[advantage].needs_critic
        for model in ("policy", "critic") if "critic" in single else ("policy",):
            assert double[model].keys() == single[model].keys()
            for key in single[model]:
                assert double[model][key] == pytest.approx(single[model][key], rel=1e-5, abs=1e-5), (
                    advantage, model, key)
    # The critic starts with a zero head, so at step 1 GAE (lambda = 1) is REINFORCE++ exactly; the others differ.
    prints = {a: json.dumps(results["single"][a]["policy"]) for a in ppo.ESTIMATORS}
    assert prints["gae"] == prints["reinforce_pp"]
    assert len({prints["gae"], prints["grpo"], prints["rloo"]}) == 3


def test_generation_under_fsdp_matches_unsharded_with_one_all_gather_per_rollout(cache_dir, tmp_path):
    out = tmp_path / "generate.json"
    launch(["tests/distributed_worker.py", "generate", str(out), "--cache-dir", cache_dir], 2)
    for rank_result in json.loads(out.read_text()):
        assert rank_result["same_4"] and rank_result["same_16"]
        assert rank_result["tokens_16"] > rank_result["tokens_4"]
        # One all-gather per FSDP module (2 decoder layers + root), however many tokens are generated...
        assert rank_result["gathers_4"] == rank_result["gathers_16"] == 3
        # ...while plain generate on the sharded model gathers at every token.
        assert rank_result["gathers_16_plain_generate"] > 16


def test_every_model_is_resharded_after_scoring(cache_dir, tmp_path):
    """After a rollout on 2 ranks, policy, reference, critic and PRM hold only their shards: no root keeps the
    gathered embedding and LM head (for a 7B model, GBs per rank) between the phases."""
    out = tmp_path / "score.json"
    launch(["tests/distributed_worker.py", "score", str(out), "--cache-dir", cache_dir], 2)
    for rank_result in json.loads(out.read_text()):
        assert rank_result == {"policy": True, "reference": True, "critic": True, "prm": True, "scored": True}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc", [None, 2])
def test_bf16_takes_the_gpu_path_on_cpu(cache_dir, tmp_path, nproc):
    """--precision bf16 on CPU, alone (a one-rank FSDP2 group) and on 2 ranks: scoring and training compute the
    same log-probs (first_ratio_error <= 1e-6 at every step), the bf16 reference equals the policy's bf16
    all-gather at step 1 (ref_kl 0), the config records it, and the policy is exported in bf16. Alone, against the
    same run in fp32: the numbers differ (it really computes in bf16), by rounding only."""
    from safetensors import safe_open

    flags = ["ppo.py", "--preset", "tiny", "--cache-dir", cache_dir, "--steps", "3", "--answer-workers", "1"]
    launch(flags + ["--precision", "bf16", "--output-dir", str(tmp_path / "bf16")], nproc)
    metrics = read_metrics(tmp_path / "bf16")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["policy/first_ratio_error"] <= 1e-6 for m in metrics), [m["policy/first_ratio_error"] for m in metrics]
    assert metrics[0]["policy/ref_kl"] == 0.0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    with safe_open(str(tmp_path / "bf16" / "policy" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    if nproc is None:
        launch(flags + ["--precision", "fp32", "--output-dir", str(tmp_path / "fp32")], None)
        fp32 = read_metrics(tmp_path / "fp32")[0]
        assert metrics[0]["policy/entropy"] != fp32["policy/entropy"]
        assert metrics[0]["policy/entropy"] == pytest.approx(fp32["policy/entropy"], rel=0.05)


def test_two_rank_run_resumes_with_the_same_metrics_and_exports_the_sharded_weights(cache_dir, tmp_path):
    common = ["ppo.py", "--preset", "tiny", "--cache-dir", cache_dir, "--reward", "clip_delta", "--answer-workers", "1",
              "--save-every", "2"]
    launch(common + ["--output-dir", str(tmp_path / "a"), "--steps", "4"], 2)
    launch(common + ["--output-dir", str(tmp_path / "b"), "--steps", "2"], 2)
    launch(common + ["--output-dir", str(tmp_path / "b"), "--steps", "4", "--resume"], 2)
    straight, resumed = ([json.loads(l) for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in a:
            if not key.startswith(("time/", "throughput/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)

    # The HF export equals the policy in the last sharded checkpoint.
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "policy")
    fresh = models.load_model(str(tmp_path / "a" / "policy"))
    state = {"policy": {k: torch.zeros_like(v) for k, v in fresh.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(tmp_path / "a" / "checkpoints" / "step_4"), no_dist=True)
    for key, value in exported.state_dict().items():
        assert torch.equal(value, state["policy"][key]), key
    # A checkpoint from 2 ranks does not resume under 1.
    with pytest.raises(SystemExit, match="saved by 2 ranks, this run has 1"):
        ppo.main(common[1:] + ["--output-dir", str(tmp_path / "a"), "--steps", "5", "--resume"])


def test_end_distributed_exits_zero_with_output_flushed_and_no_interpreter_finalisation(tmp_path):
    # The abort it prevents is a race (gloo threads alive during finalisation); what is checked here is the
    # mechanism: the rank ends with status 0, its buffered output written, and no finalisation ran (an atexit
    # handler would have written the marker).
    script = tmp_path / "end.py"
    script.write_text(
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import torch, torch.distributed as dist\n"
        "import models\n"
        "rank, world, _ = models.init_distributed()\n"
        "out = [torch.zeros(3) for _ in range(world)]\n"
        "dist.all_gather(out, torch.ones(3))\n"
        f"atexit.register(lambda: open({str(tmp_path)!r} + f'/finalised{{rank}}', 'w').close())\n"
        f"open({str(tmp_path)!r} + f'/out{{rank}}', 'w').write(str(sum(float(t.sum()) for t in out)))\n"
        "print(f'rank {rank} done', end='')\n"
        "models.end_distributed()\n"
        "print('not reached')\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 done" in done.stdout and "rank 1 done" in done.stdout and "not reached" not in done.stdout
    assert [(tmp_path / f"out{r}").read_text() for r in range(2)] == ["6.0", "6.0"]
    assert not list(tmp_path.glob("finalised*"))
