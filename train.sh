#!/usr/bin/env bash
# Named launch recipes; extra flags after the recipe name go to ppo.py (explicit flags override presets).
#
#   bash train.sh paper-1.5b          Qwen2.5-Math-1.5B-Instruct + Math-Shepherd PRM, Clip-Delta, one node of 8 GPUs
#   bash train.sh paper-7b            Qwen2.5-Math-7B-Instruct + Math-Shepherd PRM, Clip-Delta, one node of 8 x 80 GB
#   bash train.sh bench-1.5b          GPU speed and memory of the real 1.5B shape with random weights, no download
#   bash train.sh gpu-check           the device check (gpu_check.py): sdpa, bf16 step 1, decode rates, one PPO step
#   bash train.sh gpu-check-prepare   run here first: the Qwen2 config and tokenizer and the wheels, into .gpu-check/
#   bash train.sh cpu-tiny            the tiny preset on 2 CPU ranks (gloo): the distributed path without a GPU
#   bash train.sh toy-ablation        the CPU toy world: every reward at alpha = 1, then a table (and a plot: .[plot])
#   bash train.sh toy-alpha           the toy world: prm and delta at alpha = 0.5 and 0.2
#   bash train.sh toy-estimators      the toy world: every reward under every --advantage (PARALLEL=2 runs at once)
#   bash train.sh toy-hard            the harder toy world: when does a PRM help? (seeds, sample efficiency)
#   bash train.sh toy-prm             the toy world with a PRM we train (prm.py): label, train, evaluate, then PPO
#
# Example: bash train.sh paper-1.5b --reward delta --output-dir runs/delta
set -euo pipefail
cd "$(dirname "$0")"
# Rerunning a recipe continues its run folders (a finished run only re-exports its policy) instead of refusing them.
resume_if_started() { if [ -f "$1/checkpoints/latest" ]; then echo --resume; fi; }
# run_cell OUT PPO_FLAGS...: one toy run at alpha 1 in the background of a matrix, logging to OUT.log, once fewer
# than PARALLEL (default 2) runs are going. A failed run leaves OUT.failed and stops nothing else.
run_cell() {
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do sleep 1; done
  local out=$1; shift
  rm -f "$out.failed"
  mkdir -p "$(dirname "$out")"
  { python ppo.py --alpha 1 "$@" --output-dir "$out" $(resume_if_started "$out") > "$out.log" 2>&1 \
    && echo "done: $out" || { touch "$out.failed"; echo "failed: $out (see $out.log)" >&2; }; } &
}
# report_cells ROOT THRESHOLD RUN...: the table (and plot) of the runs that wrote metrics, with the first step
# whose 10-step mean success reaches THRESHOLD; exits 1 if any run failed.
report_cells() {
  local root=$1 threshold=$2 written="" failed=0 run; shift 2
  for run in "$@"; do
    [ ! -s "$run/metrics.jsonl" ] || written+=" $run"
    [ ! -e "$run.failed" ] || failed=1
  done
  [ -z "$written" ] || python report.py table $written --out "$root/report.md" --threshold "$threshold"
  return $failed
}
recipe=${1:-}
shift || true
case "$recipe" in
  paper-1.5b)
    torchrun --standalone --nproc_per_node 8 ppo.py --preset qwen2.5-math-1.5b --reward clip_delta \
      --output-dir runs/paper-1.5b $(resume_if_started runs/paper-1.5b) "$@" ;;
  paper-7b)
    torchrun --standalone --nproc_per_node 8 ppo.py --preset qwen2.5-math-7b --reward clip_delta \
      --output-dir runs/paper-7b $(resume_if_started runs/paper-7b) "$@" ;;
  bench-1.5b)
    # Speed and memory of the real Qwen2-1.5B shape with random weights (nothing to download): a model is built
    # from ../shared/qwen2-tokenizer (max_position_embeddings 4096, as Qwen2.5-Math) and trained with the
    # success reward for a few steps; metrics.jsonl then holds time/*, throughput/* and memory/peak_gb.
    # NPROC=8 bash train.sh bench-1.5b for a node.
    python - "${QWEN2_DIR:-../shared/qwen2-tokenizer}" runs/bench-1.5b-model <<'PY'
import sys
import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM
source, out = sys.argv[1:]
config = AutoConfig.from_pretrained(source, max_position_embeddings=4096)
torch.manual_seed(0)
Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(source, padding_side="left").save_pretrained(out)
PY
    torchrun --standalone --nproc_per_node "${NPROC:-1}" ppo.py --model runs/bench-1.5b-model --reward success \
      --prm none --train-data tiny --steps 3 --prompts-per-step "${NPROC:-1}" --samples-per-prompt 16 \
      --max-new-tokens 1024 --ppo-minibatches 1 --output-dir runs/bench-1.5b "$@" ;;
  gpu-check)
    # One line per part; GPU_CHECK_PARTS=a,b,c,d selects, GPU_CHECK_SHAPE=tiny runs it on CPU in a minute. On the GPU
    # machine (no network) the packages its image lacks come from .gpu-check/wheels (gpu-check-prepare).
    if ls "${GPU_CHECK_DIR:-.gpu-check}"/wheels/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
        "${GPU_CHECK_DIR:-.gpu-check}"/wheels/*.whl && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 gpu_check.py "$@" ;;
  gpu-check-prepare)
    # .gpu-check/ (git-ignored; ~15 MB) travels with the device call: the real Qwen2 config and tokenizer, and cp312
    # manylinux wheels of what the device image lacks (it has torch 2.11 and transformers 5.17; we need >= 5.24).
    mkdir -p .gpu-check/qwen2 .gpu-check/wheels
    cp "${QWEN2_DIR:-../shared/qwen2-tokenizer}"/* .gpu-check/qwen2/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu-check/wheels transformers==5.25.0 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
      kernels==0.19.1 hf-xet==1.8.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
    du -sh .gpu-check ;;
  cpu-tiny)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 ppo.py --preset tiny --reward clip_delta \
      --output-dir runs/cpu-tiny $(resume_if_started runs/cpu-tiny) "$@" ;;
  toy-ablation)
    export OMP_NUM_THREADS=1   # one thread is as fast for these sizes, and results do not depend on the core count
    for reward in success prm clip delta clip_delta minform; do
      out="runs/toy-ablation/$reward"
      python ppo.py --preset toy --reward "$reward" --alpha 1 --output-dir "$out" $(resume_if_started "$out") "$@"
    done
    python report.py table runs/toy-ablation/{success,prm,clip,delta,clip_delta,minform} --out runs/toy-ablation/report.md ;;
  toy-alpha)
    export OMP_NUM_THREADS=1
    for alpha in 0.5 0.2; do
      for reward in prm delta; do
        out="runs/toy-alpha/$reward-$alpha"
        python ppo.py --preset toy --reward "$reward" --alpha "$alpha" --output-dir "$out" $(resume_if_started "$out") "$@"
      done
    done
    python report.py table runs/toy-alpha/{prm,delta}-{0.5,0.2} --out runs/toy-alpha/report.md ;;
  toy-estimators)
    # 6 rewards x 4 estimators with the toy ablation's seed, budget and learning rates; PARALLEL runs at once,
    # one thread each, each logging to <run>.log. A failed run leaves <run>.failed and stops nothing else; the
    # report covers the runs that wrote metrics, and the recipe then exits 1.
    export OMP_NUM_THREADS=1
    root=runs/toy-estimators cells=""
    for advantage in grpo rloo reinforce_pp gae; do
      for reward in success prm clip delta clip_delta minform; do
        run_cell "$root/$reward-$advantage" --preset toy --reward "$reward" --advantage "$advantage" "$@"
        cells+=" $root/$reward-$advantage"
      done
    done
    wait
    report_cells "$root" 0.8 $cells ;;
  toy-prm)
    # The paper's setting end to end on the toy (about an hour on 2 cores): Math-Shepherd labels of 300 problems
    # (4 solutions each, 8 completions per step prefix, 2 ranks), a step-tag PRM fine-tuned from the warm start,
    # its evaluation beside the exact step verifier's, then PPO (gae, alpha 1) with the learned PRM: the five
    # PRM rewards at seed 0, clip_delta and success (no PRM) at seeds 0-2. Runs as toy-estimators does.
    export OMP_NUM_THREADS=1
    root=runs/toy-prm cells=""
    model=$(python toy.py warm-start --no-measure)
    torchrun --standalone --nproc_per_node 2 prm.py label --preset toy --problems 300 --samples 4 --completions 8 \
      --output-dir "$root/labels"
    [ -f "$root/prm/model.safetensors" ] || python prm.py train --preset toy --labels "$root/labels/labels.jsonl" \
      --epochs 5 --lr 3e-4 --batch-tokens 1024 --output-dir "$root"
    evaluate_prm() {  # evaluate_prm PRM OUT: step quality on the held-out labels, and best-of-8
      python prm.py evaluate --preset toy --prm "$1" --labels "$root/heldout.jsonl" \
        --truth toy:prefix_correct,toy:step_verifier --train-labels "$root/labels/labels.jsonl" --output-dir "$2"
    }
    evaluate_prm "$root/prm" "$root/eval-learned"
    evaluate_prm toy:step_verifier "$root/eval-verifier"
    prm_cell() {  # prm_cell REWARD SEED [FLAGS...]
      local reward=$1 seed=$2; shift 2
      run_cell "$root/$reward-s$seed" --preset toy --model "$model" --reward "$reward" --seed "$seed" "$@"
      cells+=" $root/$reward-s$seed"
    }
    for reward in clip_delta prm clip delta minform; do prm_cell "$reward" 0 --prm "$root/prm"; done
    for seed in 0 1 2; do prm_cell success "$seed"; done
    for seed in 1 2; do prm_cell clip_delta "$seed" --prm "$root/prm"; done
    wait
    report_cells "$root" 0.8 $cells ;;
  toy-hard)
    # The harder toy world: 6 rewards under gae and reinforce_pp (the best critic-free estimator of the toy
    # matrix), 3 seeds for success and clip_delta and one for the rest, success-rate threshold 0.4 for the
    # sample-efficiency column. Every seed starts from the same warm start (seed 0): --seed varies the PPO run
    # (problem order, sampling, value head). Runs as toy-estimators does.
    export OMP_NUM_THREADS=1
    root=runs/toy-hard cells=""
    model=$(python toy.py warm-start --world toy-hard --no-measure)
    hard_cell() {  # hard_cell REWARD ADVANTAGE SEED
      run_cell "$root/$1-$2-s$3" --preset toy-hard --model "$model" --reward "$1" --advantage "$2" --seed "$3" ${extra[@]+"${extra[@]}"}
      cells+=" $root/$1-$2-s$3"
    }
    extra=("$@")
    for advantage in gae reinforce_pp; do  # the comparison that matters first, then one seed of the rest
      for seed in 0 1 2; do hard_cell success "$advantage" "$seed"; hard_cell clip_delta "$advantage" "$seed"; done
    done
    for advantage in gae reinforce_pp; do
      for reward in prm clip delta minform; do hard_cell "$reward" "$advantage" 0; done
    done
    wait
    report_cells "$root" 0.4 $cells ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$recipe" ] || { echo "unknown recipe: $recipe" >&2; exit 2; } ;;
esac
