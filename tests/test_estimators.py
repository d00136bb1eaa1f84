"""The advantage estimators (ppo.ESTIMATORS) against plain-Python loops on hand-made groups.

Each reference below is written from the formula in the estimator's docstring, with lists and for-loops, and
shares no code with ppo.py. The rollouts: ragged lengths, responses without steps, equal-outcome groups,
a group with a single step reward, KL on every token.
"""

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ppo
import runlog
from rewards import RolloutRewards

EPS = 1e-6


def make(lengths, outcome, steps, ends, kl=None, alpha=1.0, beta=0.1, groups=None):
    """A RolloutRewards and its mask from lists; kl defaults to a fixed pseudo-random pattern."""
    T = max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    if kl is None:
        kl = [[((3 * i + 7 * t) % 5 - 2) / 10 if t < n else 0.0 for t in range(T)] for i, n in enumerate(lengths)]
    reward = RolloutRewards(outcome=torch.tensor(outcome), steps=[torch.tensor(u, dtype=torch.float32) for u in steps],
                            step_ends=ends, kl=torch.tensor(kl), alpha=alpha, beta=beta)
    groups = torch.tensor(groups if groups is not None else [i // 2 for i in range(len(lengths))])
    return reward, mask, groups, [list(map(float, row)) for row in kl]


def plain_token_rewards(lengths, outcome, steps, ends, kl, alpha, beta):
    rows = []
    for i, n in enumerate(lengths):
        row = [-beta * kl[i][t] for t in range(n)]
        row[n - 1] += outcome[i]
        for u, end in zip(steps[i], ends[i]):
            row[end] += alpha * u
        rows.append(row)
    return rows


def plain_to_go(row, gamma=1.0):
    out, running = [0.0] * len(row), 0.0
    for t in reversed(range(len(row))):
        running = row[t] + gamma * running
        out[t] = running
    return out


def plain_whiten(rows):
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / len(flat)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in rows]


def plain_norm(values):
    """(v - mean) / (sample std + eps), or zeros for fewer than two values."""
    if len(values) < 2:
        return [0.0] * len(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + EPS) for v in values]


def plain_reinforce_pp(lengths, outcome, steps, ends, kl, alpha, beta, groups):
    return plain_whiten([plain_to_go(r) for r in plain_token_rewards(lengths, outcome, steps, ends, kl, alpha, beta)])


def plain_rloo(lengths, outcome, steps, ends, kl, alpha, beta, groups):
    to_go = [plain_to_go(r) for r in plain_token_rewards(lengths, outcome, steps, ends, kl, alpha, beta)]
    out = []
    for i, G in enumerate(to_go):
        others = [to_go[j][0] for j in range(len(to_go)) if groups[j] == groups[i] and j != i]
        out.append([g - sum(others) / len(others) for g in G])
    return out


def plain_grpo(lengths, outcome, steps, ends, kl, alpha, beta, groups):
    out = []
    for i, n in enumerate(lengths):
        members = [j for j in range(len(lengths)) if groups[j] == groups[i]]
        outcome_adv = plain_norm([outcome[j] for j in members])[members.index(i)]
        group_steps = [(j, k) for j in members for k in range(len(steps[j]))]
        normalised = dict(zip(group_steps, plain_norm([steps[j][k] for j, k in group_steps])))
        row = []
        for t in range(n):
            process = sum(alpha * normalised[(i, k)] for k in range(len(steps[i])) if ends[i][k] >= t)
            row.append(outcome_adv + process - beta * sum(kl[i][t:n]))
        out.append(row)
    return out


def plain_gae_zero_critic(lengths, outcome, steps, ends, kl, alpha, beta, groups):
    """With V = 0 and gamma = lambda = 1, GAE's advantage is the return-to-go, whitened."""
    return plain_reinforce_pp(lengths, outcome, steps, ends, kl, alpha, beta, groups)


PLAIN = {"reinforce_pp": plain_reinforce_pp, "rloo": plain_rloo, "grpo": plain_grpo, "gae": plain_gae_zero_critic}

# (lengths, outcome, step rewards u before alpha, step ends, groups): each case names what it covers.
CASES = {
    "outcome_only": ([3, 5, 2, 4], [1.0, 0.0, 0.0, 0.0], [[], [], [], []], [[], [], [], []], [0, 0, 1, 1]),
    "dense_steps_ragged": ([6, 4, 5, 3], [1.0, 0.0, 1.0, 1.0], [[-0.2, 0.0, -0.4], [0.3, 0.1], [0.9], [-0.5, 0.2]],
                           [[1, 3, 5], [0, 3], [2], [1, 2]], [0, 0, 1, 1]),
    "equal_outcomes_and_no_steps": ([4, 4, 3, 5, 2, 6], [1.0, 1.0, 0.0, 0.0, 1.0, 0.0],
                                    [[0.5, -0.5], [], [0.1], [0.2, 0.3], [], []],
                                    [[1, 3], [], [2], [0, 4], [], []], [0, 0, 0, 1, 1, 1]),
    "group_of_one_step": ([3, 4, 5, 2], [0.0, 1.0, 1.0, 0.0], [[0.7], [], [0.2, 0.4], [0.1]],
                          [[2], [], [1, 4], [1]], [0, 0, 1, 1]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["gae", "reinforce_pp", "rloo", "grpo"])
def test_estimator_matches_plain_loop(name, case):
    lengths, outcome, steps, ends, groups = CASES[case]
    alpha, beta = 0.5, 0.1
    reward, mask, groups_t, kl = make(lengths, outcome, steps, ends, alpha=alpha, beta=beta, groups=groups)
    cfg = SimpleNamespace(gamma=1.0, lam=1.0)
    values = torch.zeros_like(mask) if ppo.ESTIMATORS[name].needs_critic else None
    advantages, returns = ppo.ESTIMATORS[name](reward, values, mask, groups_t, cfg)
    expected = PLAIN[name](lengths, outcome, steps, ends, kl, alpha, beta, groups)
    assert advantages.shape == mask.shape and (advantages * (1 - mask)).abs().max() == 0  # 0 off the mask
    for i, row in enumerate(expected):
        assert advantages[i, :lengths[i]].tolist() == pytest.approx(row, abs=1e-5), (name, case, i)
    assert (returns is None) == (not ppo.ESTIMATORS[name].needs_critic)
    if returns is not None:  # zero critic: the targets are the plain returns-to-go
        to_go = [plain_to_go(r) for r in plain_token_rewards(lengths, outcome, steps, ends, kl, alpha, beta)]
        for i, row in enumerate(to_go):
            assert returns[i, :lengths[i]].tolist() == pytest.approx(row, abs=1e-5)


def test_gae_with_a_critic_matches_plain_loop():
    lengths, outcome, steps, ends, groups = CASES["dense_steps_ragged"]
    reward, mask, groups_t, kl = make(lengths, outcome, steps, ends, alpha=1.0, beta=0.1)
    values = torch.tensor([[0.1 * ((i + t) % 4) for t in range(mask.shape[1])] for i in range(len(lengths))]) * mask
    cfg = SimpleNamespace(gamma=0.9, lam=0.8)
    advantages, returns = ppo.ESTIMATORS["gae"](reward, values, mask, groups_t, cfg)
    raw = []
    for i, r in enumerate(plain_token_rewards(lengths, outcome, steps, ends, kl, 1.0, 0.1)):
        v = values[i].tolist()[:lengths[i]] + [0.0]
        row, running = [0.0] * lengths[i], 0.0
        for t in reversed(range(lengths[i])):
            running = r[t] + 0.9 * v[t + 1] - v[t] + 0.9 * 0.8 * running
            row[t] = running
        raw.append(row)
        assert returns[i, :lengths[i]].tolist() == pytest.approx([a + b for a, b in zip(row, v)], abs=1e-5)
    for i, row in enumerate(plain_whiten(raw)):
        assert advantages[i, :lengths[i]].tolist() == pytest.approx(row, abs=1e-5)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_outcome_only_without_kl_gives_the_textbook_forms(name):
    lengths, outcome = [3, 5, 2, 4, 3, 3], [1.0, 0.0, 1.0, 0.3, 0.3, 0.3]
    groups = [0, 0, 0, 1, 1, 1]
    reward, mask, groups_t, _ = make(lengths, outcome, [[]] * 6, [[]] * 6, kl=[[0.0] * 5] * 6, beta=0.0,
                                     groups=groups)
    advantages, _ = ppo.ESTIMATORS[name](reward, None, mask, groups_t, SimpleNamespace(gamma=1.0, lam=1.0))
    first = [1.0, 0.0, 1.0]
    if name == "grpo":
        mean, std = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
        expected = [(r - mean) / (std + EPS) for r in first]
    else:
        expected = [r - (sum(first) - r) / 2 for r in first]
    for i in range(3):  # the same advantage on every token of the response
        assert advantages[i, :lengths[i]].tolist() == pytest.approx([expected[i]] * lengths[i], abs=1e-6)
    assert advantages[3:].abs().max() == 0  # equal outcomes in a group: advantage 0


@pytest.mark.parametrize("name", ["gae", "rloo", "reinforce_pp"])
def test_dense_credit_is_kept(name):
    # Response 0: its only step reward sits on step 2 (ends at token 3 of 7): one advantage before, another after.
    lengths = [7, 7]
    reward, mask, groups, _ = make(lengths, [0.0, 0.0], [[0.0, -0.5, 0.0], []], [[1, 3, 6], []],
                                   kl=[[0.0] * 7] * 2, beta=0.0)
    values = torch.zeros_like(mask) if name == "gae" else None
    advantages, _ = ppo.ESTIMATORS[name](reward, values, mask, groups, SimpleNamespace(gamma=1.0, lam=1.0))
    row = advantages[0].tolist()
    assert len(set(row[:4])) == 1 and len(set(row[4:])) == 1 and row[0] < row[4]


def test_grpo_normalises_step_rewards_before_alpha_over_the_group():
    # Two responses, steps u = [0, -1] and [-1]: group mean -2/3, sample std sqrt(1/3); alpha 2 scales after.
    reward, mask, groups, _ = make([3, 2], [1.0, 1.0], [[0.0, -1.0], [-1.0]], [[0, 2], [1]], kl=[[0.0] * 3] * 2,
                                   alpha=2.0, beta=0.0, groups=[0, 0])
    advantages, _ = ppo.ESTIMATORS["grpo"](reward, None, mask, groups, SimpleNamespace(gamma=1.0))
    s = [2 * (u + 2 / 3) / (math.sqrt(1 / 3) + EPS) for u in (0.0, -1.0, -1.0)]
    assert advantages[0].tolist() == pytest.approx([s[0] + s[1], s[1], s[1]], abs=1e-5)
    assert advantages[1, :2].tolist() == pytest.approx([s[2], s[2]], abs=1e-5)
    # Under Clip (all u <= 0) a right step (u = 0) earns a positive reward once normalised.
    assert s[0] > 0


def test_equal_outcome_groups_counts_groups_not_responses():
    outcome = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert runlog.equal_outcome_groups(outcome, torch.tensor([0, 0, 1, 1, 2, 2])) == 2
    assert runlog.equal_outcome_groups(outcome, torch.tensor([5, 5, 5, 7, 7, 7])) == 0


def test_readme_estimator_table_lists_the_registry():
    """README's `--advantage` table: exactly the registry's names, each with its critic column."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Advantage estimators (`--advantage`)", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\| `\w+`", line)]
    table = {re.match(r" `(\w+)`", row[1]).group(1): row[3].strip() for row in rows}
    assert table == {name: "yes" if e.needs_critic else "no" for name, e in ppo.ESTIMATORS.items()}
