#!/usr/bin/env bash
# Named launch recipes; extra flags after the recipe name go to ppo.py (explicit flags override presets).
#
#   bash train.sh paper-1.5b          Qwen2.5-Math-1.5B-Instruct + Math-Shepherd PRM, Clip-Delta, one node of 8 GPUs
#   bash train.sh paper-7b            Qwen2.5-Math-7B-Instruct + Math-Shepherd PRM, Clip-Delta, one node of 8 x 80 GB
#   bash train.sh bench-1.5b          GPU speed and memory of the real 1.5B shape with random weights, no download
#   bash train.sh cpu-tiny            the tiny preset on 2 CPU ranks (gloo): the distributed path without a GPU
#   bash train.sh toy-ablation        the CPU toy world: every reward at alpha = 1, then a table (and a plot: .[plot])
#   bash train.sh toy-alpha           the toy world: prm and delta at alpha = 0.5 and 0.2
#   bash train.sh toy-estimators      the toy world: every reward under every --advantage (PARALLEL=2 runs at once)
#
# Example: bash train.sh paper-1.5b --reward delta --output-dir runs/delta
set -euo pipefail
cd "$(dirname "$0")"
# Rerunning a recipe continues its run folders (a finished run only re-exports its policy) instead of refusing them.
resume_if_started() { if [ -f "$1/checkpoints/latest" ]; then echo --resume; fi; }
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
  cpu-tiny)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 ppo.py --preset tiny --reward clip_delta \
      --output-dir runs/cpu-tiny $(resume_if_started runs/cpu-tiny) "$@" ;;
  toy-ablation)
    export OMP_NUM_THREADS=1   # one thread is as fast for these sizes, and results do not depend on the core count
    for reward in success prm clip delta clip_delta minform; do
      out="runs/toy-ablation/$reward"
      python ppo.py --preset toy --reward "$reward" --alpha 1 --output-dir "$out" $(resume_if_started "$out") "$@"
    done
    python toy.py report runs/toy-ablation/{success,prm,clip,delta,clip_delta,minform} --out runs/toy-ablation/report.md ;;
  toy-alpha)
    export OMP_NUM_THREADS=1
    for alpha in 0.5 0.2; do
      for reward in prm delta; do
        out="runs/toy-alpha/$reward-$alpha"
        python ppo.py --preset toy --reward "$reward" --alpha "$alpha" --output-dir "$out" $(resume_if_started "$out") "$@"
      done
    done
    python toy.py report runs/toy-alpha/{prm,delta}-{0.5,0.2} --out runs/toy-alpha/report.md ;;
  toy-estimators)
    # 6 rewards x 4 estimators with the toy ablation's seed, budget and learning rates; PARALLEL runs at once,
    # one thread each, each logging to <run>.log. A failed run leaves <run>.failed and stops nothing else; the
    # report covers the runs that wrote metrics, and the recipe then exits 1.
    export OMP_NUM_THREADS=1
    root=runs/toy-estimators
    mkdir -p "$root"
    run_cell() {  # run_cell ADVANTAGE REWARD [ppo.py flags]
      local out="$root/$2-$1"
      rm -f "$out.failed"
      python ppo.py --preset toy --reward "$2" --alpha 1 --advantage "$1" --output-dir "$out" \
        $(resume_if_started "$out") "${@:3}" > "$out.log" 2>&1 || { touch "$out.failed"; echo "failed: $out (see $out.log)" >&2; return 0; }
      echo "done: $out"
    }
    estimators="grpo rloo reinforce_pp gae" rewards="success prm clip delta clip_delta minform"
    for advantage in $estimators; do
      for reward in $rewards; do
        while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do sleep 1; done
        run_cell "$advantage" "$reward" "$@" &
      done
    done
    wait
    written=$(for a in $estimators; do for r in $rewards; do [ ! -s "$root/$r-$a/metrics.jsonl" ] || echo "$root/$r-$a"; done; done)
    [ -z "$written" ] || python toy.py report $written --out "$root/report.md"
    ! ls "$root"/*.failed > /dev/null 2>&1 ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$recipe" ] || { echo "unknown recipe: $recipe" >&2; exit 2; } ;;
esac
