"""One whole PPO step on a tiny model, recomputed by straightforward code and compared stage by stage.

The step runs at temperature 0.7, with learning-rate warm-up, two epochs of two minibatches whose
micro-batches hold several rows, a KL term that is not zero (the policy is perturbed away from the
reference first), a critic whose values are not zero, and a checker that calls every answer correct (so a
truncated response must still get success 0). The reference forwards every response alone, unpadded,
writes rewards, GAE and losses with Python loops, and trains copies of the models with one backward per
minibatch. Everything it shares with ppo.py is the shuffle seed, which the update documents.
"""

import copy
import math

import pytest
import torch

import data
import models
import ppo
from test_estimators import PLAIN, plain_to_go, plain_whiten

FLAGS = ["--preset", "tiny", "--temperature", "0.7", "--samples-per-prompt", "4", "--max-new-tokens", "12",
         "--warmup-steps", "3", "--ppo-epochs", "2", "--ppo-minibatches", "2", "--micro-batch-tokens", "256",
         "--reward", "clip_delta", "--beta", "0.5", "--alpha", "0.5"]


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def one_step(tmp_path, monkeypatch, advantage, extra=()):
    """(cfg, copies of the models before the step, ro, metrics, run after the step) for one PPO step.

    A random tiny model rarely samples EOS, so every third response is cut to half and ended with EOS:
    finished and truncated responses then both occur, whatever the machine's kernels sample.
    """
    sample = models.generate

    def generate_some_finished(*args, **kwargs):
        stop = kwargs["stop_ids"][0]
        return [r[:len(r) // 2] + [stop] if i % 3 == 0 else r for i, r in enumerate(sample(*args, **kwargs))]

    monkeypatch.setattr(models, "generate", generate_some_finished)
    cfg = ppo.parse_config([*FLAGS, "--advantage", advantage, *extra, "--cache-dir", str(tmp_path / "cache"),
                            "--output-dir", str(tmp_path / "out")])
    ppo.validate(cfg, world=1)
    ppo.resolve_local_models(cfg, rank=0)
    run = ppo.setup(cfg, 0, 1, torch.device("cpu"))
    run.checker = lambda texts, answers: [True] * len(texts)  # truncated responses too: success must say no
    perturb(run.policy, 0.02, seed=1)  # policy != reference, so the KL term is not zero
    if run.critic is not None:
        perturb(run.critic.value_head, 0.1, seed=2)  # values != 0
    before = dict(policy=copy.deepcopy(run.policy), reference=copy.deepcopy(run.reference),
                  critic=copy.deepcopy(run.critic))
    problems, _ = data.tokenize_prompts(run.tokenizer, data.tiny_problems(seed=0), cfg.max_prompt_tokens)
    torch.manual_seed(0)
    ro = ppo.rollout(cfg, problems[:cfg.prompts_per_step], run)
    metrics = ppo.train_on_rollout(cfg, 1, ro, run)
    return cfg, before, ro, metrics, run


def alone_logp(model, prompt, response, temperature):
    """Log-probs of `response` after `prompt`, one unpadded sequence: [len(response)] fp32."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def alone_values(critic, prompt, response):
    """V(state before each response token), one unpadded sequence: [len(response)]."""
    return critic(input_ids=torch.tensor([prompt + response]))[0, len(prompt) - 1:-1]


def clip_delta(scores, eta):
    """Delta of the clipped scores; the last step's score is left to the success reward (0 there)."""
    c = [min(s - eta, 0.0) for s in scores]
    K = len(c)
    return [c[k] - c[k + 1] if k < K - 2 else (c[k] if k == K - 2 else 0.0) for k in range(K)]


def plain_gae(rewards, values):
    """gamma = lambda = 1: A_t = sum_{t' >= t} r_t' - V_t (the value after the last token is 0)."""
    return [g - v for g, v in zip(plain_to_go(rewards), values)]


def plain_kl(logp, ref_logp, estimator):
    """One token's KL estimate from its two log-probs, written from the formulas (k3 unclamped: the tiny step
    never gets near the clamps)."""
    log_ratio = logp - ref_logp  # a float, or a 0-d tensor that carries the gradient
    exp = torch.exp if torch.is_tensor(log_ratio) else math.exp
    return {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2, "k3": exp(-log_ratio) - 1 + log_ratio}[estimator]


def plain_aggregate(sums, lengths, mode, max_new_tokens):
    """A minibatch's loss from each response's summed per-token loss and its length, by --loss-agg."""
    if mode == "token-mean":
        return sum(sums) / sum(lengths)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(sums, lengths)) / len(sums)
    return sum(s / max_new_tokens for s in sums) / len(sums)  # seq-mean-token-sum-norm


def reference_update(cfg, before, ro, targets, step=1):
    """Train copies of the models on the rollout with one backward per minibatch; returns (policy, critic,
    minibatch policy losses, value losses, policy grad norms, KL loss terms)."""
    policy, critic = copy.deepcopy(before["policy"]), copy.deepcopy(before["critic"])
    trained = [(policy, cfg.policy_lr)] + ([(critic, cfg.critic_lr)] if critic is not None else [])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0) for m, lr in trained]
    B = len(ro.response_ids)
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009)  # as ppo.update documents
    losses, value_losses, kl_losses, norms, optimizer_steps = [], [], [], [], 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=shuffle).tolist()
        size = B // cfg.ppo_minibatches
        for m in range(cfg.ppo_minibatches):
            rows = order[m * size:(m + 1) * size]
            lengths = [len(ro.response_ids[i]) for i in rows]
            p_sums, v_sums, kl_sums = [], [], []
            for i in rows:
                prompt, response = ro.prompt_ids[i], ro.response_ids[i]
                logp = alone_logp(policy, prompt, response, cfg.temperature)
                ratio = torch.exp(logp - targets["old_logp"][i])
                adv = torch.tensor(targets["advantages"][i])
                p_sums.append(torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).sum())
                if cfg.kl_in == "loss":
                    kl_sums.append(sum(plain_kl(lp, r, cfg.kl_estimator) for lp, r in zip(logp, targets["ref_logp"][i])))
                if critic is not None:
                    v, v_old = alone_values(critic, prompt, response), targets["values"][i]
                    g = torch.tensor(targets["returns"][i])
                    v_clipped = v_old + (v - v_old).clamp(-cfg.value_clip, cfg.value_clip)
                    v_sums.append((0.5 * torch.maximum((v - g) ** 2, (v_clipped - g) ** 2)).sum())
            p_loss = plain_aggregate(p_sums, lengths, cfg.loss_agg, cfg.max_new_tokens)
            v_loss = plain_aggregate(v_sums, lengths, cfg.loss_agg, cfg.max_new_tokens) if v_sums else torch.zeros(())
            kl_loss = cfg.beta * plain_aggregate(kl_sums, lengths, cfg.loss_agg, cfg.max_new_tokens) if kl_sums else 0.0
            (p_loss + kl_loss + v_loss).backward()
            losses.append(float(p_loss.detach()))
            value_losses.append(float(v_loss))
            kl_losses.append(float(kl_loss))
            warm = min(1.0, (optimizer_steps + 1) / cfg.warmup_steps)
            for (model, lr), optimizer in zip(trained, optimizers):
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if model is policy:
                    norms.append(float(norm))
                optimizer.param_groups[0]["lr"] = lr * warm
                optimizer.step()
                optimizer.zero_grad()
            optimizer_steps += 1
    return policy, critic, losses, value_losses, norms, kl_losses


def relative_change_error(after, before, reference):
    """|| (after - before) - (reference - before) || / || reference - before || over all parameters."""
    diff = sum(((a - r) ** 2).sum() for a, r in zip(after.parameters(), reference.parameters()))
    moved = sum(((r - b) ** 2).sum() for r, b in zip(reference.parameters(), before.parameters()))
    return float(diff.sqrt() / moved.sqrt())


# Every estimator with the defaults (KL k1 in the reward, token-mean), then every other --loss-agg, each KL
# estimator in the reward, and the KL in the loss.
CASES = [(advantage, ()) for advantage in ppo.ESTIMATORS] + [
    ("gae", ("--loss-agg", "seq-mean-token-mean", "--kl-estimator", "k3")),
    ("reinforce_pp", ("--loss-agg", "seq-mean-token-sum-norm", "--kl-estimator", "k2", "--kl-in", "loss")),
    ("grpo", ("--loss-agg", "seq-mean-token-mean", "--kl-estimator", "k3", "--kl-in", "loss")),
    ("rloo", ("--loss-agg", "seq-mean-token-sum-norm", "--kl-estimator", "k2")),
]


@pytest.mark.parametrize("advantage,extra", CASES)
def test_one_step_equals_straightforward_recomputation(tmp_path, monkeypatch, advantage, extra):
    cfg, before, ro, metrics, run = one_step(tmp_path, monkeypatch, advantage, extra)
    B, T = ro.mask.shape
    prompts, responses = ro.prompt_ids, ro.response_ids
    lengths = [len(r) for r in responses]
    # 2a. Scores: every response alone, unpadded, at the sampling temperature.
    with torch.no_grad():
        old_logp = [alone_logp(before["policy"], p, r, cfg.temperature) for p, r in zip(prompts, responses)]
        ref_logp = [alone_logp(before["reference"], p, r, cfg.temperature) for p, r in zip(prompts, responses)]
        values = ([alone_values(before["critic"], p, r) for p, r in zip(prompts, responses)]
                  if before["critic"] is not None else None)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(ro.old_logp[i, :n], old_logp[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.ref_logp[i, :n], ref_logp[i], atol=1e-5, rtol=1e-5)
        if values is not None:
            torch.testing.assert_close(ro.values[i, :n], values[i], atol=1e-5, rtol=1e-5)
    assert (advantage == "gae") == (ro.values is not None), "a critic is scored exactly when the estimator needs one"
    # 2b. Success: correct and ended by a stop token; the checker said correct to all, so truncated means 0.
    eos = set(run.stop_ids)
    truncated = [r[-1] not in eos for r in responses]
    assert any(truncated) and not all(truncated), "the step needs both truncated and finished responses"
    assert ro.success.tolist() == [0.0 if t else 1.0 for t in truncated]
    # 3. Token rewards: success on the last token, alpha * Clip-Delta step rewards at step ends, -beta * KL.
    kl_ref = [[plain_kl(o, r, cfg.kl_estimator) for o, r in zip(o_row.tolist(), r_row.tolist())]
              for o_row, r_row in zip(old_logp, ref_logp)]
    assert max(abs(x) for row in kl_ref for x in row) > 1e-3, "the KL term must not be zero in this test"
    kl = kl_ref if cfg.kl_in == "reward" else [[0.0] * len(row) for row in kl_ref]  # in the loss: no estimator sees it
    k1 = sum(float((o - r).sum()) for o, r in zip(old_logp, ref_logp))  # logged as k1 whatever --kl-estimator
    assert metrics["policy/ref_kl"] == pytest.approx(k1 / B, rel=1e-4)
    assert metrics["reward/kl"] == pytest.approx(-cfg.beta * sum(map(sum, kl)) / B, rel=1e-4, abs=1e-12)
    outcome = [0.0 if t else 1.0 for t in truncated]
    steps = [clip_delta([float(s) for s in scores], cfg.eta) for scores in ro.step_scores]
    for i in range(B):
        torch.testing.assert_close(ro.step_rewards[i], torch.tensor([cfg.alpha * u for u in steps[i]]),
                                   atol=1e-6, rtol=0)
    groups = [i // cfg.samples_per_prompt for i in range(B)]
    # 4-5. Advantages and the critic's targets.
    if advantage == "gae":
        token_rewards = [[-cfg.beta * x for x in kl[i]] for i in range(B)]
        for i in range(B):
            token_rewards[i][-1] += outcome[i]
            for u, end in zip(steps[i], ro.step_ends[i]):
                token_rewards[i][end] += cfg.alpha * u
        raw = [plain_gae(token_rewards[i], values[i].tolist()) for i in range(B)]
        advantages = plain_whiten(raw)
        returns = [[a + v for a, v in zip(raw[i], values[i].tolist())] for i in range(B)]
    else:
        advantages = PLAIN[advantage](lengths, outcome, steps, ro.step_ends, kl, cfg.alpha, cfg.beta, groups)
        returns = None
        assert ro.returns is None
    for i, n in enumerate(lengths):
        torch.testing.assert_close(ro.advantages[i, :n], torch.tensor(advantages[i]), atol=1e-4, rtol=1e-4)
        if returns is not None:
            torch.testing.assert_close(ro.returns[i, :n], torch.tensor(returns[i]), atol=1e-4, rtol=1e-4)
    # 6. The update: losses per minibatch, gradient norms, and where the parameters end up.
    targets = dict(old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, returns=returns, values=values)
    policy, critic, losses, value_losses, norms, kl_losses = reference_update(cfg, before, ro, targets)
    if cfg.kl_in == "loss":
        assert metrics["loss/kl"] == pytest.approx(sum(kl_losses) / len(kl_losses), rel=1e-4)
    else:
        assert "loss/kl" not in metrics
    assert metrics["loss/policy"] == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-6)
    assert metrics["policy/grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    if critic is not None:
        assert metrics["loss/value"] == pytest.approx(sum(value_losses) / len(value_losses), rel=1e-4)
        assert relative_change_error(run.critic, before["critic"], critic) < 0.02
    assert relative_change_error(run.policy, before["policy"], policy) < 0.02
    assert math.isfinite(metrics["policy/first_ratio_error"]) and metrics["policy/first_ratio_error"] < 1e-5
