"""`bash train.sh gpu-check` at the tiny shape, on CPU, from a clone with nothing prepared: the card line and the
four part lines, exit 0. (On a GPU the same script measures the real 1.5B shape.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu_at_the_tiny_shape(tmp_path):
    env = dict(os.environ, GPU_CHECK_SHAPE="tiny", GPU_CHECK_DIR=str(tmp_path / "not-prepared"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(["bash", "train.sh", "gpu-check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if re.match(r"(card|part [abcd]):", line)]
    assert lines[0].startswith("card: cpu, copy ") and "TFLOP/s" in lines[0]
    parts = {line[5]: line[8:] for line in lines[1:]}
    assert set(parts) == set("abcd"), lines
    assert "NaN" not in parts["a"] and "model forward finite" in parts["a"]
    assert parts["b"] == "first_ratio_error 0.00e+00, ref_kl at step 1 0.00e+00"  # CPU bf16: exactly
    assert re.search(r"update [\d.]+ s, training MFU [\d.]+%, peak n/a \(CPU\), plan [\d.]+ GiB", parts["d"])
    assert re.search(r"generate b4 [\d,]+ tok/s \(\d+% of roofline", parts["c"])


def test_gpu_check_names_a_bad_part():
    env = dict(os.environ, GPU_CHECK_SHAPE="tiny", GPU_CHECK_PARTS="a,x")
    done = subprocess.run([sys.executable, "gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "GPU_CHECK_PARTS" in done.stderr
