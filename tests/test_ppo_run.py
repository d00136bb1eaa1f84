"""ppo.py end to end on the `tiny` preset: every reward, resume, export, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

import data
import models
import ppo
import rewards


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(cache_dir, out, *flags):
    ppo.main(["--preset", "tiny", "--cache-dir", cache_dir, "--output-dir", str(out), "--answer-workers", "1", *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reward", ["success", "orm", *rewards.STEP_TRANSFORMS])
def test_every_reward_runs_two_tiny_steps(cache_dir, tmp_path, reward):
    metrics = run(cache_dir, tmp_path, "--reward", reward, "--steps", "2")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("reward/success", "reward/process", "reward/kl", "response/length", "response/steps",
                    "response/truncated", "loss/policy", "loss/value", "policy/approx_kl", "policy/clip_frac",
                    "policy/entropy", "value/explained_var", "time/rollout", "time/update", "throughput/tokens_per_s"):
            assert math.isfinite(m[key]), (reward, key, m[key])
    # Step 1: the policy is the reference, and the first minibatch is scored by the weights that sampled it.
    assert metrics[0]["policy/ref_kl"] == 0.0 and metrics[0]["reward/kl"] == 0.0
    assert metrics[0]["policy/first_ratio_error"] < 1e-5
    if reward in ("success", "orm"):
        assert metrics[0]["reward/process"] == 0.0
    if reward in ("clip", "clip_delta"):
        assert all(m["reward/process"] <= 0 for m in metrics)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["step_rewards"]) == len(s["step_scores"]) or reward in ("success", "orm") for s in samples)


@pytest.mark.parametrize("advantage", list(ppo.ESTIMATORS))
def test_resume_gives_the_same_metrics_and_export_loads(cache_dir, tmp_path, advantage):
    """With learning-rate warm-up longer than the first run, so the schedule must be restored, not restarted."""
    flags = ["--save-every", "2", "--reward", "clip_delta", "--advantage", advantage, "--warmup-steps", "6"]
    straight = run(cache_dir, tmp_path / "a", "--steps", "4", *flags)
    run(cache_dir, tmp_path / "b", "--steps", "2", *flags)
    resumed = run(cache_dir, tmp_path / "b", "--steps", "4", *flags, "--resume")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in a:
            if not key.startswith(("time/", "throughput/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # keep-N: the latest checkpoints only, and a pointer to the newest
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_4"
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "policy")
    assert exported.num_parameters() > 0
    assert (tmp_path / "a" / "critic").is_dir() == (advantage == "gae")


@pytest.mark.parametrize("advantage", [a for a, e in ppo.ESTIMATORS.items() if not e.needs_critic])
def test_a_critic_free_run_never_builds_or_calls_a_critic(cache_dir, tmp_path, monkeypatch, advantage):
    def no_critic(*args, **kwargs):
        raise AssertionError("a critic was built or called under a critic-free estimator")

    monkeypatch.setattr(models.Critic, "load", no_critic)
    monkeypatch.setattr(models.Critic, "__init__", no_critic)
    monkeypatch.setattr(models.Critic, "forward", no_critic)
    metrics = run(cache_dir, tmp_path, "--steps", "2", "--save-every", "1", "--advantage", advantage)
    run(cache_dir, tmp_path, "--steps", "3", "--advantage", advantage, "--resume")
    assert not (tmp_path / "critic").exists()
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step_3")).read_metadata().state_dict_metadata
    assert keys and not any(k.startswith("critic") for k in keys), sorted(keys)[:5]
    assert not any(k.startswith(("loss/value", "value/")) for m in metrics for k in m)
    assert 0.0 <= metrics[0]["advantage/equal_outcome_groups"] <= 1.0


def test_a_checkpoint_from_before_advantage_and_prm_revision_resumes_as_gae(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "--steps", "1", "--reward", "delta")
    state_path = tmp_path / "checkpoints" / "step_1" / "state.json"
    state = json.loads(state_path.read_text())
    # what a checkpoint written before these flags lacks
    for key in ("advantage", "prm_revision", "kl_estimator", "kl_in", "loss_agg"):
        del state["config"][key]
    state_path.write_text(json.dumps(state))
    assert [m["step"] for m in run(cache_dir, tmp_path, "--steps", "2", "--reward", "delta", "--resume")] == [1, 2]
    with pytest.raises(SystemExit, match="--advantage 'gae' \\(now 'grpo'\\)"):
        run(cache_dir, tmp_path, "--steps", "3", "--reward", "delta", "--advantage", "grpo", "--resume")
    for flags, saved in ((["--kl-estimator", "k2"], "--kl-estimator 'k1'"), (["--loss-agg", "seq-mean-token-mean"],
                         "--loss-agg 'token-mean'"), (["--kl-in", "loss", "--kl-estimator", "k3"], "--kl-in 'reward'")):
        with pytest.raises(SystemExit, match=saved):  # they resume as k1 / reward / token-mean, and nothing else
            run(cache_dir, tmp_path, "--steps", "3", "--reward", "delta", *flags, "--resume")


def test_resume_refuses_a_checkpoint_from_another_config(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "--steps", "1", "--reward", "delta")
    with pytest.raises(SystemExit, match="--beta"):
        run(cache_dir, tmp_path, "--steps", "2", "--reward", "delta", "--beta", "0.5", "--resume")


@pytest.mark.parametrize("flags,message", [
    (["--reward", "nonsense"], "--reward: unknown 'nonsense'; choose one of success, orm, prm, clip, delta, clip_delta, minform"),
    (["--reward", "clip", "--prm", "none"], "--prm is none"),
    (["--reward", "orm", "--orm", "none"], "--reward orm needs --orm"),
    (["--prompts-per-step", "3", "--samples-per-prompt", "1", "--ppo-minibatches", "2"], "--ppo-minibatches 2 does not divide"),
    (["--model", "./no/such/model"], "--model: no such folder"),
    (["--train-data", str(Path(__file__).parent / "fixtures" / "bad" / "rows.jsonl")], "--train-data: .*rows.jsonl row"),
    (["--train-data", "nosuchsource"], "--train-data: data source 'nosuchsource'"),
    (["--advantage", "ppo2"], "--advantage: unknown 'ppo2'; choose one of gae, grpo, rloo, reinforce_pp"),
    (["--advantage", "grpo", "--critic", "some/critic"], "--critic some/critic: --advantage grpo is critic-free"),
    (["--advantage", "rloo", "--samples-per-prompt", "1"], "--advantage rloo .* needs --samples-per-prompt >= 2"),
    (["--kl-estimator", "k4"], "--kl-estimator: unknown 'k4'; choose one of k1, k2, k3"),
    (["--kl-in", "value"], "--kl-in: unknown 'value'; choose one of reward, loss"),
    (["--kl-in", "loss", "--kl-estimator", "k1"], "--kl-in loss --kl-estimator k1: k1's gradient in the loss is zero"),
    (["--loss-agg", "seq-sum"], "--loss-agg: unknown 'seq-sum'; choose one of token-mean, seq-mean-token-mean, "
                                "seq-mean-token-sum-norm"),
])
def test_bad_input_is_named_before_any_work(cache_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(cache_dir, tmp_path, *flags)


def test_non_finite_loss_stops_with_the_step(cache_dir, tmp_path, monkeypatch):
    real = ppo.policy_loss

    def broken(*args, **kwargs):
        loss, clipped = real(*args, **kwargs)
        return loss * float("nan"), clipped

    monkeypatch.setattr(ppo, "policy_loss", broken)
    with pytest.raises(RuntimeError, match="step 1: non-finite loss"):
        run(cache_dir, tmp_path, "--steps", "1")


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        ppo.parse_config(["--help"])
    out = capsys.readouterr().out
    for name in ("--reward", "--alpha", "--eta", "--beta", "--minform-temperature", "--resume", "--preset"):
        assert name in out
    assert "ReaLHF" in out and "unpickles" in out
    # the registry flags list what their registries hold now, each with its one-line doc
    for name, entry in ppo.ESTIMATORS.items():
        assert "".join(f"{name} ({entry.doc};".split()) in "".join(out.split())  # argparse wraps at hyphens
    for name in [*ppo.KL_ESTIMATORS, *ppo.LOSS_AGGREGATIONS]:
        assert f"{name} (" in " ".join(out.split())


def test_a_registered_lambda_is_a_choice(monkeypatch, capsys):
    """README's one-line registrations: a lambda (no docstring) in either registry is a choice with a --help."""
    monkeypatch.setitem(ppo.KL_ESTIMATORS, "abs", lambda logp, ref_logp: (logp - ref_logp).abs())
    monkeypatch.setitem(ppo.LOSS_AGGREGATIONS, "seq-sum", lambda masked, mask, size: masked.sum() / size.responses)
    cfg = ppo.parse_config(["--kl-estimator", "abs", "--loss-agg", "seq-sum"])
    ppo.validate_choice("--kl-estimator", cfg.kl_estimator, ppo.KL_ESTIMATORS)
    ppo.validate_choice("--loss-agg", cfg.loss_agg, ppo.LOSS_AGGREGATIONS)
    with pytest.raises(SystemExit):
        ppo.parse_config(["--help"])
    assert "abs ()" in " ".join(capsys.readouterr().out.split())


def test_preset_fills_fields_and_flags_override():
    cfg = ppo.parse_config(["--preset", "tiny", "--max-new-tokens", "7"])
    assert cfg.prompts_per_step == ppo.PRESETS["tiny"]["prompts_per_step"] and cfg.max_new_tokens == 7
    default = ppo.parse_config([])
    assert default.model == "Qwen/Qwen2.5-Math-1.5B-Instruct" and default.prm == "peiyi9979/math-shepherd-mistral-7b-prm"
    assert default.step_delimiter == "\n\n" and not default.trust_remote_code


def test_eval_every_logs_greedy_accuracy(cache_dir, tmp_path):
    metrics = run(cache_dir, tmp_path, "--steps", "2", "--eval-every", "2", "--eval-size", "3")
    assert "eval/accuracy" not in metrics[0]
    assert 0.0 <= metrics[1]["eval/accuracy"] <= 1.0


def test_a_transform_registered_at_run_time_is_a_reward_choice(cache_dir, tmp_path, monkeypatch):
    """The README's "add your own transform": one dict entry, and --reward accepts it."""
    monkeypatch.setitem(rewards.STEP_TRANSFORMS, "flat", lambda scores, cfg: torch.full_like(scores, -0.25))
    metrics = run(cache_dir, tmp_path, "--reward", "flat", "--steps", "1", "--alpha", "2")
    # alpha * (-0.25) on every step of every response
    assert metrics[0]["reward/process"] == pytest.approx(-0.5 * metrics[0]["response/steps"])


def test_a_kill_mid_save_leaves_the_previous_checkpoint_usable(cache_dir, tmp_path):
    """Simulate kills: one inside the save (a step_N.tmp folder), one between the rename and the pointer
    update (step_2 complete, `latest` still on step_1). Resuming redoes step 2 and saves over the stale folder."""
    first = run(cache_dir, tmp_path, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "3")
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest").write_text("step_1")
    (checkpoints / "step_3.tmp").mkdir()
    again = run(cache_dir, tmp_path, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "3", "--resume")
    assert [m["step"] for m in again] == [1, 2]
    assert again[1]["reward/total"] == pytest.approx(first[1]["reward/total"], abs=1e-6)
    assert (checkpoints / "latest").read_text() == "step_2"
    # A new run does not silently mix with an old run's checkpoints.
    with pytest.raises(SystemExit, match="holds another run's checkpoints"):
        run(cache_dir, tmp_path, "--steps", "3")


def test_keeps_the_last_n_checkpoints_and_exports_a_critic_that_reloads(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "--steps", "4", "--save-every", "1", "--keep-checkpoints", "2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_3", "step_4"]
    import torch.distributed.checkpoint as dcp

    critic = models.Critic.load(str(tmp_path / "critic"), flag="--critic")
    state = {"critic": {k: torch.zeros_like(v) for k, v in critic.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoints" / "step_4"), no_dist=True)
    for key, value in critic.state_dict().items():
        assert torch.equal(value, state["critic"][key]), key
    assert critic.value_head.weight.abs().sum() > 0  # trained, not a fresh zero head


def test_an_unreachable_hub_id_names_the_flag_the_id_and_the_local_presets(cache_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--model: could not load .nobody/no-such-model.*--preset tiny"):
        run(cache_dir, tmp_path, "--model", "nobody/no-such-model", "--steps", "1")


def test_a_local_folder_that_is_not_a_model_names_the_flag_and_what_it_needs(cache_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--model: could not load the local folder .*empty.*config.json"):
        run(cache_dir, tmp_path / "out", "--model", str(tmp_path / "empty"), "--steps", "1")


def test_an_unreachable_hub_dataset_names_the_flag_and_what_to_do(cache_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--train-data: data source 'gsm8k': could not load openai/gsm8k.*local"):
        run(cache_dir, tmp_path, "--train-data", "gsm8k", "--steps", "1")


def test_a_folder_with_only_pickled_weights_is_refused_in_one_line(cache_dir, tmp_path):
    """Like peiyi9979/math-shepherd-mistral-7b-prm's main branch: config, tokenizer, pytorch_model.bin."""
    import shutil

    policy = models.build_tiny(Path(cache_dir) / "tiny")["policy"]
    pickled = tmp_path / "pickled"
    shutil.copytree(policy, pickled)
    torch.save(models.load_model(str(policy)).state_dict(), pickled / "pytorch_model.bin")
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(SystemExit, match=r"--model: '.*pickled' has only pickled .bin weights.*safetensors"):
        run(cache_dir, tmp_path / "out", "--model", str(pickled), "--steps", "1")
    with pytest.raises(SystemExit, match=r"--prm: '.*pickled' has only pickled .bin weights"):
        run(cache_dir, tmp_path / "out2", "--prm", str(pickled), "--reward", "prm", "--steps", "1")


@pytest.mark.parametrize("message", [  # what transformers says of a hub repo without safetensors (two phrasings)
    "peiyi9979/math-shepherd-mistral-7b-prm does not appear to have a file named model.safetensors. Checkout ...",
    "Error no file named model.safetensors found in directory /cache/models--peiyi9979--math-shepherd/snapshots/x",
])
def test_a_hub_model_without_safetensors_names_the_revision_and_the_flag_to_try(message):
    err = models._hub_error("--prm", "peiyi9979/math-shepherd-mistral-7b-prm", OSError(message), "main")
    assert "at revision main has no safetensors weights" in str(err) and "try --prm-revision" in str(err)
    err = models._hub_error("--model", "someone/model", OSError(message), None)
    assert "never load pickles" in str(err) and "--model-revision" not in str(err)


def test_sampling_ignores_the_checkpoints_top_k_and_top_p(cache_dir):
    """The tiny policy's generation_config says top_k 40, top_p 0.7: a rollout must sample from the whole
    distribution at --temperature, so some sampled tokens lie outside the top 40 and outside the 0.7 nucleus."""
    cfg = ppo.parse_config(["--preset", "tiny", "--cache-dir", cache_dir, "--temperature", "0.7",
                            "--samples-per-prompt", "8"])
    ppo.resolve_local_models(cfg, rank=0)
    policy = models.load_model(cfg.model, flag="--model", device="cpu")
    assert policy.generation_config.top_k == 40 and policy.generation_config.top_p == 0.7
    tokenizer = models.load_tokenizer(cfg.model)
    problems, _ = data.tokenize_prompts(tokenizer, data.tiny_problems(seed=0), cfg.max_prompt_tokens)
    torch.manual_seed(0)
    prompts = [p["prompt_ids"] for p in problems[:4] for _ in range(cfg.samples_per_prompt)]
    responses = models.generate(policy, prompts, pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    ranks, mass_before = [], []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            logits = policy(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / cfg.temperature
            probs = torch.softmax(logits.float(), -1)
            for t, token in enumerate(response):
                higher = probs[t] > probs[t, token]
                ranks.append(int(higher.sum()))  # 0 for the most likely token
                mass_before.append(float(probs[t][higher].sum()))
    assert max(ranks) >= 40, "no sampled token outside the top 40: the checkpoint's top_k leaked into sampling"
    assert max(mass_before) >= 0.7, "no sampled token outside the 0.7 nucleus: top_p leaked into sampling"


def test_wandb_logs_the_same_metrics_and_the_config_offline(cache_dir, tmp_path, monkeypatch):
    """The real library in offline mode (no network): every metrics.jsonl row goes to wandb.log with its step,
    the run config goes to wandb.config, and the offline run is written under the output folder."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, runs = [], []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        runs.append(self)
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    metrics = run(cache_dir, tmp_path, "--steps", "2", "--wandb-project", "prm-ppo-test", "--reward", "delta")
    assert logged == [(m["step"], {k: v for k, v in m.items() if k != "step"}) for m in metrics]
    assert runs[0].config["reward"] == "delta" and runs[0].config["wandb_project"] == "prm-ppo-test"
    assert runs[0].name == tmp_path.name
    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_without_wandb_project_nothing_imports_wandb(cache_dir, tmp_path):
    import subprocess
    import sys

    code = ("import sys, ppo; ppo.main(['--preset', 'tiny', '--steps', '1', '--answer-workers', '1', '--cache-dir', "
            f"{cache_dir!r}, '--output-dir', {str(tmp_path)!r}]); print('wandb' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_prm_revision_reaches_every_from_pretrained_of_the_prm_and_config_json(cache_dir, tmp_path, monkeypatch):
    import transformers

    seen = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, name)

        def spy(path, *args, _real=cls.from_pretrained, **kwargs):
            seen.append((str(path), kwargs.get("revision")))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    run(cache_dir, tmp_path, "--reward", "prm", "--steps", "1", "--prm-revision", "v1")
    config = json.loads((tmp_path / "config.json").read_text())
    prm_loads = [revision for path, revision in seen if path == config["prm"]]
    assert len(prm_loads) >= 3 and set(prm_loads) == {"v1"}, seen  # config, tokenizer, weights
    assert config["prm_revision"] == "v1"
    assert {revision for path, revision in seen if path == config["model"]} == {None}


def test_the_math_shepherd_prm_is_pinned_to_its_safetensors_revision():
    for flags in ([], ["--preset", "qwen2.5-math-1.5b"], ["--preset", "qwen2.5-math-7b"]):
        assert ppo.parse_config(flags).prm_revision == "refs/pr/5"
    assert ppo.parse_config(["--prm", "Qwen/Qwen2.5-Math-PRM-7B"]).prm_revision is None
    assert ppo.parse_config(["--prm-revision", "abc123"]).prm_revision == "abc123"
