"""The device check: what the GPU path does on a real card, in a few minutes, one line per part.

    bash train.sh gpu-check-prepare                 # here, with ../shared: fills .gpu-check/ (tokenizer, config, wheels)
    bash train.sh gpu-check                         # on the GPU machine: parts a, b, d, then c
    GPU_CHECK_PARTS=a,b,d bash train.sh gpu-check   # some parts only
    GPU_CHECK_SHAPE=tiny python gpu_check.py        # the same code on CPU at a tiny shape (tests, a fresh clone)

First the card: its name, its device-copy bandwidth and its bf16 matmul rate, measured; rooflines and MFU are
against these. Then, each part printing one line `part X: <figures>` (or `part X: skipped (<reason>)`) and
stopping at its own time budget with what it measured:
  a  a left-padded sdpa forward (fully masked query rows) on each attention kernel: NaN or not;
  b  `policy/first_ratio_error` and `policy/ref_kl` at step 1 under --precision bf16, from (d)'s first step;
  c  decode tokens/s at the real 1.5B shape with random weights (512 new tokens): HF generate at batch 64 and
     256, with a static cache and torch.compile at 64, and transformers' continuous batching, each against the
     HBM roofline (weights + KV cache read per decode step / bandwidth);
  d  one PPO step at the 1.5B shape (random weights, `--precision bf16`, success reward): seconds per phase,
     training MFU, peak memory against `ppo.py --memory-plan 1`'s figure.
The script exits 1 if a selected part fails. It uses no torch API newer than 2.11 (the device image's).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import models

PREPARED = Path(os.environ.get("GPU_CHECK_DIR", ".gpu-check"))
SHAPES = {  # the model (and run) sizes of each shape: the real 1.5B, and a tiny one that runs on CPU in seconds
    "real": dict(new_tokens=512, batches=(64, 256), decode_budget_s=45, ppo_budget_s=240, bench_bytes=2**30,
                 bench_matmul=8192),
    "tiny": dict(new_tokens=8, batches=(4, 8), decode_budget_s=20, ppo_budget_s=120, bench_bytes=2**24,
                 bench_matmul=256),
}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def timed(fn, repeats: int = 3) -> float:
    """Best seconds of `repeats` calls (after one warm-up), synchronised."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device().type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def card(shape: dict) -> dict:
    """The card's name, its device-copy bandwidth (read + write bytes / s) and bf16 matmul rate (FLOP/s)."""
    dev = device()
    src = torch.empty(shape["bench_bytes"] // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src))
    n = shape["bench_matmul"]
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    flops = 2 * n ** 3 / timed(lambda: a @ b)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"card: {name}, copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s", flush=True)
    return {"name": name, "bandwidth": bandwidth, "flops": flops}


# -------------------------------------------------------------------------------------------------
# a: sdpa with fully masked rows
# -------------------------------------------------------------------------------------------------


def part_a(shape: dict, card_info: dict, folder: Path) -> str:
    """Left padding makes a pad query row fully masked: each kernel must give finite numbers (0 there), as
    transformers' sdpa mask assumes. Every backend the device has, then the model's own left-padded forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = device()
    q = torch.randn(2, 4, 16, 64, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool, device=dev).tril()
    mask[0, :, :, :5] = False  # row 0 left-padded by 5: its first 5 queries see nothing
    results = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            results.append(f"{backend.name.lower()} {'NaN' if out.isnan().any() else 'finite'}")
        except RuntimeError:  # the kernel does not take this input (a bool mask) or this device
            results.append(f"{backend.name.lower()} n/a")
    model = models.load_model(str(folder), dtype=torch.bfloat16, device=dev).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device=dev)
    attention = torch.ones_like(ids)
    attention[0, :5] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention,
                       position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).logits
    finite = bool(logits[attention.bool()].isfinite().all())
    results.append(f"model forward {'finite' if finite else 'NaN'} on real tokens")
    if any("NaN" in r for r in results):
        raise RuntimeError("; ".join(results))
    return "; ".join(results)


# -------------------------------------------------------------------------------------------------
# c: decode throughput against the HBM roofline
# -------------------------------------------------------------------------------------------------


def parameter_count(config) -> int:
    """A causal LM's parameters from its config alone (built on the meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def roofline_tokens_per_s(config, batch: int, context: int, bandwidth: float) -> float:
    """Decode tokens/s if a step only had to read the bf16 weights once and every sequence's KV cache (`context`
    tokens, the mean over the generation) at the measured bandwidth."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2  # bytes per cached token
    weights = 2 * parameter_count(config)
    return batch / ((weights + batch * context * kv) / bandwidth)


def decode_rate(model, batch: int, new_tokens: int, **generate_kwargs) -> float:
    """Generated tokens/s of HF generate on `batch` random prompts of 128 tokens, exactly `new_tokens` each."""
    from transformers import GenerationConfig

    ids = torch.randint(0, model.config.vocab_size, (batch, 128), device=device())
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                              top_p=1.0, pad_token_id=0, eos_token_id=None, **generate_kwargs)
    seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           generation_config=config), repeats=1)
    return batch * new_tokens / seconds


def continuous_batching_rate(model, batch: int, new_tokens: int) -> float:
    from transformers import GenerationConfig

    prompts = torch.randint(0, model.config.vocab_size, (batch, 128)).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                              top_p=1.0, pad_token_id=0, eos_token_id=None)
    seconds = timed(lambda: model.generate_batch(prompts, generation_config=config, warmup=False), repeats=1)
    return batch * new_tokens / seconds


def part_c(shape: dict, card_info: dict, folder: Path) -> str:
    model = models.load_model(str(folder), dtype=torch.bfloat16, device=device()).eval()
    n, context = shape["new_tokens"], 128 + shape["new_tokens"] // 2
    deadline = time.perf_counter() + shape["decode_budget_s"]
    runs = [(f"generate b{b}", b, lambda b=b: decode_rate(model, b, n)) for b in shape["batches"]]
    b = shape["batches"][0]
    if device().type == "cuda":
        runs.append((f"static+compile b{b}", b, lambda: decode_rate(
            torch.compile(model, mode="reduce-overhead"), b, n, cache_implementation="static")))
    runs.append((f"continuous batching b{b}", b, lambda: continuous_batching_rate(model, b, n)))
    figures = []
    for label, batch, measure in runs:
        if time.perf_counter() > deadline:
            figures.append(f"{label} skipped (time budget)")
            continue
        try:
            rate = measure()
        except Exception as err:  # one path failing (e.g. compile) leaves the others measured
            figures.append(f"{label} failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
            continue
        roof = roofline_tokens_per_s(model.config, batch, context, card_info["bandwidth"])
        figures.append(f"{label} {rate:,.0f} tok/s ({100 * rate / roof:.0f}% of roofline {roof:,.0f})")
    return "; ".join(figures)


# -------------------------------------------------------------------------------------------------
# d (and b): one PPO step through ppo.py, against the memory plan
# -------------------------------------------------------------------------------------------------


def ppo_flags(folder: Path, out: Path, shape_name: str) -> list[str]:
    samples = "16" if shape_name == "real" else "2"
    new = "1024" if shape_name == "real" else "16"
    return ["--model", str(folder), "--reward", "success", "--prm", "none", "--train-data", "tiny",
            "--precision", "bf16", "--steps", "1", "--prompts-per-step", "1", "--samples-per-prompt", samples,
            "--max-new-tokens", new, "--ppo-minibatches", "1", "--answer-workers", "1", "--output-dir", str(out)]


def train_flops(metrics: dict, params: int) -> float:
    """Model FLOPs of the update: policy and critic forward + backward over every prompt and response token,
    6 x parameters x tokens each (the critic has almost the policy's parameters); recomputation by checkpointing
    is not counted (MFU's convention)."""
    tokens = metrics["throughput/tokens_per_s"] * metrics["time/step"]  # prompt + response tokens of the step
    return 2 * 6 * params * tokens


def part_d(shape: dict, card_info: dict, folder: Path, shape_name: str, out: Path) -> tuple[str, dict]:
    flags = ppo_flags(folder, out / "ppo", shape_name)
    run = subprocess.run([sys.executable, "ppo.py", *flags], capture_output=True, text=True,
                         timeout=shape["ppo_budget_s"])
    if run.returncode:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "ppo.py failed")
    metrics = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    plan_run = subprocess.run([sys.executable, "ppo.py", *ppo_flags(folder, out / "plan", shape_name),
                               "--memory-plan", "1"], capture_output=True, text=True, timeout=120)
    planned = json.loads((out / "plan" / "memory-plan.json").read_text())["peak"] if not plan_run.returncode else None
    params = parameter_count(models.load_config(str(folder), "--model"))
    mfu = train_flops(metrics, params) / metrics["time/update"] / card_info["flops"]
    peak = metrics.get("memory/peak_gb")
    memory = (f"peak {peak:.1f} GiB vs plan {planned:.1f} GiB" if peak is not None and planned is not None
              else f"peak {'n/a (CPU)' if peak is None else f'{peak:.1f} GiB'}, plan "
              f"{'n/a' if planned is None else f'{planned:.2f} GiB'}")
    line = (f"rollout {metrics['time/rollout']:.1f} s, score {metrics['time/score']:.1f} s, update "
            f"{metrics['time/update']:.1f} s, training MFU {100 * mfu:.1f}%, {memory}")
    return line, metrics


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------


def model_folder(shape_name: str, out: Path) -> Path:
    """A folder with the run's model, random weights: the real Qwen2-1.5B shape from the prepared config and
    tokenizer (.gpu-check/qwen2, from ../shared/qwen2-tokenizer), or the tiny one built here."""
    if shape_name == "tiny":
        return models.build_tiny(out / "tiny")["policy"]
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    source = PREPARED / "qwen2"
    if not (source / "config.json").is_file():
        raise SystemExit(f"gpu_check: {source} has no config.json; run `bash train.sh gpu-check-prepare` first")
    folder = out / "qwen2-1.5b-random"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(source, max_position_embeddings=4096)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(source, padding_side="left").save_pretrained(folder)
    return folder


def main() -> int:
    shape_name = os.environ.get("GPU_CHECK_SHAPE", "real")
    parts = os.environ.get("GPU_CHECK_PARTS", "a,b,d,c").split(",")
    if shape_name not in SHAPES or not set(parts) <= set("abcd"):
        raise SystemExit(f"gpu_check: GPU_CHECK_SHAPE real|tiny, GPU_CHECK_PARTS of a,b,c,d (got {shape_name}, {parts})")
    shape, out = SHAPES[shape_name], Path(tempfile.mkdtemp(prefix="gpu-check-"))
    card_info, folder = card(shape), model_folder(shape_name, out)
    ppo_step: dict = {}  # (d)'s line and metrics, or its error: run once for (b) and (d)

    def run_part(part: str) -> str:
        if part == "a":
            return part_a(shape, card_info, folder)
        if part == "c":
            return part_c(shape, card_info, folder)
        if not ppo_step:
            try:
                ppo_step["line"], ppo_step["metrics"] = part_d(shape, card_info, folder, shape_name, out)
            except Exception as err:
                ppo_step["error"] = err
        if "error" in ppo_step:
            raise ppo_step["error"]
        if part == "d":
            return ppo_step["line"]
        metrics = ppo_step["metrics"]
        return (f"first_ratio_error {metrics['policy/first_ratio_error']:.2e}, ref_kl at step 1 "
                f"{metrics['policy/ref_kl']:.2e}")

    failed = False
    for part in parts:
        try:
            line = run_part(part)
        except Exception as err:
            failed, line = True, f"failed ({type(err).__name__}: {str(err)[:300]})"
        print(f"part {part}: {line}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
