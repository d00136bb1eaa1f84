"""The PPO math in ppo.py against independent references: plain loops and hand-computed numbers."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

import data
import models
import ppo


def tokens(n: float) -> ppo.LossAggregation:
    """The default aggregation (token-mean) of a minibatch of n valid tokens."""
    return ppo.LossAggregation("token-mean", tokens=n, responses=1, max_new_tokens=1)


def gae_reference(rewards, values, length, gamma, lam):
    """Textbook GAE on one response of `length` tokens, in plain Python; the value after the end is 0."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_plain_loop_on_ragged_masks(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 9
    lengths = [9, 1, 5, 0, 7, 3]
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref_adv, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx(ref_ret, abs=1e-5)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.2, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.1, 0.3, 0.2]])
    adv, ret = ppo.compute_gae(rewards, values, torch.ones(1, 4), 1.0, 1.0)
    assert ret[0].tolist() == pytest.approx([1.2, 1.2, 1.0, 1.0])
    assert adv[0].tolist() == pytest.approx([0.7, 1.1, 0.7, 0.8])


def test_whiten_over_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = ppo.whiten(x, mask)
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)
    assert out[0, :2].tolist() == pytest.approx([-1 / std, 0.0], abs=1e-4)
    assert out[1, 0].item() == pytest.approx(1 / std, abs=1e-4)
    assert out[0, 2] == 0 and out[1, 1:].abs().sum() == 0


def test_policy_loss_by_hand_clipped_and_unclipped():
    # Three tokens, eps 0.2: ratio 1.5 with A=+1 (clipped to 1.2), ratio 0.5 with A=+2 (unclipped: the min
    # objective keeps 0.5*2), ratio 0.5 with A=-1 (clipped to 0.8); a fourth token is masked out.
    ratios = torch.tensor([[1.5, 0.5, 0.5, 3.0]])
    old = torch.zeros(1, 4)
    logp = ratios.log()
    adv = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = ppo.policy_loss(logp, old, adv, mask, 0.2, tokens(3))
    expected = (-1.2 + -1.0 + 0.8) / 3  # per token: max(-A r, -A clip(r))
    assert loss.item() == pytest.approx(expected)
    assert clipped.item() == 2
    # Inactive clipping: ratio 1 everywhere gives -mean(A) and no clipped tokens.
    loss, clipped = ppo.policy_loss(old, old, adv, mask, 0.2, tokens(3))
    assert loss.item() == pytest.approx(-(1 + 2 - 1) / 3) and clipped.item() == 0


def test_policy_loss_gradient_normalised_by_given_token_count():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo.policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2, tokens(8))
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1 / 8, -1 / 8])


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.0, 0.4]])
    returns = torch.tensor([[0.0, 1.0, 0.45]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    # token 0: unclipped (1-0)^2 = 1, clipped V = 0.7 -> 0.49 -> max 1
    # token 1: unclipped 1, clipped V = 0 -> 1 -> 1
    # token 2: unclipped 0.0025, clipped V = 0.5 (within 0.2) -> 0.0025
    loss = ppo.value_loss(values, old, returns, mask, 0.2, tokens(3))
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 0.0025) / 3)
    # clipping active: the clipped value is further from the return and wins the max
    loss = ppo.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.9]]), torch.ones(1, 1), 0.2, tokens(1))
    assert loss.item() == pytest.approx(0.5 * 0.7 ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_chunked_equals_log_softmax_and_gradients(dtype):
    """Chunked log-probs and entropy through the head against one plain fp32 log_softmax of hidden @ weight.T,
    and their gradients (hidden and head alike). Given bf16 operands, the matmul still runs in fp32: the result
    equals the fp32 computation on the bf16 values exactly."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 6, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(11, 6, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(11, generator=gen).to(dtype)
    targets = torch.randint(0, 11, (37,), generator=gen)
    logits = (hidden.float() @ weight.float().T + bias.float()) / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    out, entropy = models.token_logprobs(hidden, weight, targets, 0.7, bias=bias, with_entropy=True, chunk_rows=8)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), (hidden, weight))
    expected = torch.autograd.grad(ref.sum(), (hidden, weight))
    # fp32: equal to rounding. bf16: a gradient is rounded to bf16 (8 bits), and the head's is summed over the
    # chunks in bf16 (as autograd accumulates a bf16 leaf's), a few bf16 steps from the sum taken in fp32.
    for got, want, rtol in zip(grads, expected, (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 5e-2)):
        assert torch.allclose(got.float(), want.float(), rtol=rtol, atol=rtol)
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)


def test_response_logprobs_and_values_index_the_right_columns(tiny_paths):
    """Against the model's own per-token log-probs computed on each unpadded sequence separately."""
    torch.manual_seed(0)
    policy = models.load_model(str(tiny_paths["policy"]))
    critic = models.Critic.load(str(tiny_paths["policy"]), flag="--critic")
    torch.nn.init.normal_(critic.value_head.weight)  # a non-zero head, so the columns matter
    rollout = SimpleNamespace(prompt_ids=[[5, 6, 7], [8, 9], [10, 11, 12, 13]],
                              response_ids=[[20, 21, 2], [22], [23, 24, 25, 26, 27]])
    batch = data.collate(rollout, [0, 1, 2], pad_id=0, device="cpu")
    with torch.no_grad():
        logp = models.response_logprobs(policy, batch, temperature=0.8)
        values = models.response_values(critic, batch)
        for row, (p, r) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
            ids = torch.tensor([p + r])
            full = torch.log_softmax(policy(ids).logits[0].float() / 0.8, -1)
            expected = [full[len(p) - 1 + i, tok].item() for i, tok in enumerate(r)]
            assert logp[row, :len(r)].tolist() == pytest.approx(expected, abs=1e-4)
            own_values = critic(ids)[0]
            assert values[row, :len(r)].tolist() == pytest.approx(own_values[len(p) - 1:len(p) - 1 + len(r)].tolist(), abs=1e-4)


def test_micro_batches_respect_budget_and_cover_everything():
    rng = random.Random(0)
    prompt_lens = [rng.randint(1, 30) for _ in range(50)]
    response_lens = [rng.randint(0, 60) for _ in range(50)]
    groups = data.micro_batches(list(range(50)), prompt_lens, response_lens, token_budget=200)
    assert sorted(i for g in groups for i in g) == list(range(50))
    for g in groups:
        width = max(prompt_lens[i] for i in g) + max(response_lens[i] for i in g)
        assert len(g) == 1 or len(g) * width <= 200


def test_kl_estimators_by_hand():
    """log r = logp - ref_logp = 0.5 and -0.5: k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r."""
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])
    assert ppo.KL_ESTIMATORS["k1"](logp, ref).tolist() == pytest.approx([0.5, -0.5])
    assert ppo.KL_ESTIMATORS["k2"](logp, ref).tolist() == pytest.approx([0.125, 0.125])
    assert ppo.KL_ESTIMATORS["k3"](logp, ref).tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5])
    # k3 is clamped (log r to +-20, k3 to <= 10): a token the reference finds near impossible cannot explode it
    assert ppo.KL_ESTIMATORS["k3"](torch.tensor([-60.0]), torch.tensor([0.0])).item() == 10.0
    # equal log-probs: every estimator is 0
    assert all(ppo.KL_ESTIMATORS[k](ref, ref).abs().max() == 0 for k in ppo.KL_ESTIMATORS)


def test_kl_gradients_in_the_loss_match_their_divergences():
    """On a 3-token distribution, sampling every token with its probability (an exact expectation): the gradient
    of E[k2] is that of KL(pi || ref), E[k3]'s that of KL(ref || pi), E[k1]'s is 0 (what --kl-in loss relies on)."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.3]), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        weights = logp.exp().detach()  # sampling probabilities: no gradient flows through the sampling
        (grad,) = torch.autograd.grad((weights * ppo.KL_ESTIMATORS[estimator](logp, ref)).sum(), theta)
        return grad

    def divergence_grad(forward: bool):
        logp = torch.log_softmax(theta, -1)
        kl = (logp.exp() * (logp - ref)).sum() if forward else (ref.exp() * (ref - logp)).sum()
        (grad,) = torch.autograd.grad(kl, theta)
        return grad

    torch.testing.assert_close(expected_grad("k2"), divergence_grad(forward=True))
    torch.testing.assert_close(expected_grad("k3"), divergence_grad(forward=False))
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(3), atol=1e-7, rtol=0)


def test_loss_aggregations_by_hand():
    """LossAggregation's docstring example: token-mean 7/4, seq-mean-token-mean (1 + 4) / 2, Dr. GRPO (3/4 + 4/4) / 2."""
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = {"token-mean": 1.75, "seq-mean-token-mean": 2.5, "seq-mean-token-sum-norm": 0.875}
    assert set(expected) == set(ppo.LOSS_AGGREGATIONS)
    for mode, value in expected.items():
        aggregate = ppo.LossAggregation(mode, tokens=4, responses=2, max_new_tokens=4)
        assert aggregate(per_token, mask).item() == pytest.approx(value)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregation_does_not_depend_on_micro_batching(mode):
    """Summing the aggregates of any split of the rows gives the aggregate of the whole minibatch."""
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=gen)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]).float()
    aggregate = ppo.LossAggregation(mode, tokens=mask.sum().item(), responses=6, max_new_tokens=5)
    split = sum(aggregate(per_token[rows], mask[rows]) for rows in ([0, 4], [1], [2, 3, 5]))
    assert split.item() == pytest.approx(aggregate(per_token, mask).item(), abs=1e-6)
