"""Worker for tests/test_memory.py: the memory plan's simulation on real tensors, under torch.distributed.run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/memory_worker.py SPEC.json OUT.json

SPEC.json: {"cfg": {ppo.Config's fields}, "with_critic": bool, "uses_prm": bool, "uses_orm": bool}. Every rank
builds the run's models with random weights, shards them over gloo and runs the phases under torch's memory
trackers (`memory.simulate(..., fake=False)`, the code path `memory.plan` runs on fake tensors). Then HF
`generate` itself (which fake tensors cannot run) samples a full rollout batch from the gathered policy, measured
the same way: the check on simulating generation as a prefill and one decode step against a full cache. Rank 0
writes {"plan": {phase: GiB}, "details": {...}, "hf_generate": GiB} to OUT.json.
"""

import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import memory  # noqa: E402
import models  # noqa: E402

torch.set_num_threads(1)


class GenerateTracker(memory._tracker("mem").__class__):
    """The plan's tracker, for a loop of forwards: each new call of the root starts a new "iteration" (the tracker
    refuses a second call of a module otherwise)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def _pre_fw_hook(self, module, inputs):
        if module is self.root and module in self.memory_tracking:
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


def hf_generate(cfg, spec) -> float:
    """GiB over the resident state while `models.generate` samples --generation-batch-size responses of exactly
    --max-new-tokens tokens (the stop id is one the vocabulary lacks) from the gathered policy."""
    policy = memory._build(spec, cfg, sharded=True, fake=False).eval()
    tracker = GenerateTracker(policy)
    tracker.track_external(policy)
    base = memory._current(tracker)
    prompts = [[1] * cfg.max_prompt_tokens] * cfg.generation_batch_size
    with tracker, models.gathered(policy):
        responses = models.generate(policy, prompts, pad_id=0, stop_ids=[spec.config.vocab_size],
                                    max_new_tokens=cfg.max_new_tokens)
    assert all(len(r) == cfg.max_new_tokens for r in responses)
    return memory._peak_over(tracker, base) / memory.GIB


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = types.SimpleNamespace(**spec.pop("cfg"))
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    plan = memory.simulate(cfg, dist.get_world_size(), fake=False, **spec)
    generate = plan["resident"] + hf_generate(cfg, memory.model_specs(cfg, **spec)[0][0])
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"plan": dict(plan), "details": plan.details, "hf_generate": generate},
                                             indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
    models.end_distributed()
