"""Steps, step-end token indices, PRM / ORM adapters, reward transforms and placement (rewards.py).

References are independent of the code under test: hand-computed vectors, plain loops over decoded
prefixes, and direct unpadded forwards of the tiny models on input strings written out by hand.
"""

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import models
from rewards import (
    STEP_TRANSFORMS,
    SequenceORM,
    StepTagPRM,
    TokenClassifierPRM,
    clip_delta_rewards,
    clip_rewards,
    delta_rewards,
    minform_rewards,
    place_rewards,
    split_steps,
    step_end_indices,
    transform_steps,
    RolloutRewards,
)

CFG = SimpleNamespace(eta=0.5, minform_temperature=0.1)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# -------------------------------------------------------------------------------------------------
# split_steps / step_end_indices
# -------------------------------------------------------------------------------------------------


def test_split_steps():
    assert split_steps("a\n\nb\n\nc") == ["a", "b", "c"]
    assert split_steps("  a \n\n\n\n \n\nb\n\n") == ["a", "b"]
    assert split_steps("a\n\n\nb") == ["a", "b"]  # "\nb" stripped
    assert split_steps("") == [] and split_steps("\n\n \n\n") == []
    assert split_steps("a\nb\n\nc", delimiter="\n") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a", delimiter="")


def reference_step_ends(token_ids, tokenizer, delimiter="\n\n"):
    """Plain loop: for each non-final step, the first token whose decoded prefix contains the whole
    delimiter after the step; the final step ends at the last token."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    steps = split_steps(text, delimiter)
    ends, search_from = [], 0
    for step in steps[:-1]:
        start = text.index(step, search_from)
        delimiter_end = text.index(delimiter, start + len(step)) + len(delimiter)
        i = 0
        while not tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True).startswith(text[:delimiter_end]):
            i += 1
        ends.append(i)
        search_from = delimiter_end
    if steps:
        ends.append(len(token_ids) - 1)
    return ends


def test_step_end_indices_qwen2_docstring_example(qwen2_tokenizer):
    tok = qwen2_tokenizer
    ids = tok.encode("We get 7\n\nThus 14.\n\nDone", add_special_tokens=False) + [tok.eos_token_id]
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[3:5] == ["7", "\n\n"] and pieces[9] == ".\n\n"  # separate and merged delimiters
    assert step_end_indices(ids, tok) == [4, 9, 11]
    assert step_end_indices(ids[:-1], tok) == [4, 9, 10]  # truncated: the final step ends at the last token


def test_step_end_indices_merged_and_triple_newlines(tiny_tokenizer, qwen2_tokenizer):
    for tok in (tiny_tokenizer, qwen2_tokenizer):
        ids = tok.encode("x.\n\ny", add_special_tokens=False)
        assert [tok.decode([i]) for i in ids] == ["x", ".\n\n", "y"]
        assert step_end_indices(ids, tok) == [1, 2]
        assert step_end_indices(ids + [tok.eos_token_id], tok) == [1, 3]
    tiny = tiny_tokenizer
    ids = tiny.encode("7\n\n\nx", add_special_tokens=False)  # tiny: 7, \n, \n, \n, x
    assert [tiny.decode([i]) for i in ids] == ["7", "\n", "\n", "\n", "x"]
    assert step_end_indices(ids, tiny) == [2, 4]  # the second newline completes the delimiter
    qwen = qwen2_tokenizer
    ids = qwen.encode("7\n\n\nx", add_special_tokens=False)  # qwen: 7, \n\n\n, x
    assert [qwen.decode([i]) for i in ids] == ["7", "\n\n\n", "x"]
    assert step_end_indices(ids, qwen) == [1, 2]


def test_step_end_indices_multibyte_characters(tiny_tokenizer, qwen2_tokenizer):
    # Qwen2: "√" is split over two byte tokens; tiny: every non-ASCII character is split into bytes.
    qwen = qwen2_tokenizer
    ids = qwen.encode("x = √2\n\n中文 ok", add_special_tokens=False) + [qwen.eos_token_id]
    assert [qwen.decode([i]) for i in ids][2:6] == [" \ufffd", "\ufffd", "2", "\n\n"]
    assert step_end_indices(ids, qwen) == [5, 8]
    tiny = tiny_tokenizer
    ids = tiny.encode("é.\n\n\nß", add_special_tokens=False) + [tiny.eos_token_id]
    assert len(ids) == 7  # é (2 bytes), ".\n\n", "\n", ß (2 bytes), EOS
    assert step_end_indices(ids, tiny) == [2, 6]
    # a step that ends inside a character: the delimiter comes only after the emoji's last byte
    ids = tiny.encode("a😊\n\nb", add_special_tokens=False)
    assert step_end_indices(ids, tiny) == reference_step_ends(ids, tiny)
    # truncated inside a multi-byte character: the text ends with a replacement character
    ids = tiny.encode("a\n\nb😊", add_special_tokens=False)[:-1]
    assert tiny.decode(ids).endswith("\ufffd")
    assert step_end_indices(ids, tiny) == [2, len(ids) - 1]  # tiny: "a", "\n", "\n", "b", 3 of 4 emoji bytes


def test_step_end_indices_empty_and_blank(tiny_tokenizer):
    tok = tiny_tokenizer
    assert step_end_indices([], tok) == []
    assert step_end_indices([tok.eos_token_id], tok) == []
    assert step_end_indices(tok.encode("\n\n  \n\n", add_special_tokens=False), tok) == []
    ids = tok.encode("one step only", add_special_tokens=False)
    assert step_end_indices(ids, tok) == [len(ids) - 1]


PIECES = ["Step", " 1", ":", " 3+4=7", ".", "x", " = ", "14", "\\frac{1}{2}", "é", "√", "×", "π", "😊", "中文",
          "ß", " ", "\n", "\n\n", "\n\n\n", ".\n\n", " \n\n", "\n\n\n\n", "\\boxed{7}", "ки"]


@pytest.mark.parametrize("which", ["tiny", "qwen2"])
def test_step_end_indices_random_texts_match_reference(which, request):
    tok = request.getfixturevalue("tiny_tokenizer" if which == "tiny" else "qwen2_tokenizer")
    rng = random.Random(0)
    for case in range(120):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
        ids = tok.encode(text, add_special_tokens=False)
        if case % 3 == 0:
            ids = ids + [tok.eos_token_id]
        elif case % 3 == 1 and ids:
            ids = ids[: rng.randint(0, len(ids))]  # truncated anywhere, possibly inside a character
        delimiter = "\n" if case % 10 == 9 else "\n\n"
        got = step_end_indices(ids, tok, delimiter)
        assert len(got) == len(split_steps(tok.decode(ids, skip_special_tokens=True), delimiter)), repr(text)
        assert got == reference_step_ends(ids, tok, delimiter), repr(text)
        assert got == sorted(got) and all(0 <= i < len(ids) for i in got)


# -------------------------------------------------------------------------------------------------
# PRM and ORM adapters
# -------------------------------------------------------------------------------------------------

QUESTIONS = ["What is 3+4?", "Compute 12 - 5, then double it.", "Is 9 a square?"]
STEPS = [["3+4=7.", "So \\boxed{7}."], ["12 - 5 = 7", "7 × 2 = 14", "The answer is \\boxed{14}."], []]
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def step_tag_prm(tiny_paths):
    return models.load_model(str(tiny_paths["step_tag_prm"])), models.load_tokenizer(str(tiny_paths["step_tag_prm"]))


@pytest.fixture(scope="module")
def token_classifier_prm(tiny_paths):
    path = str(tiny_paths["token_classifier_prm"])
    return models.load_model(path, "AutoModelForTokenClassification"), models.load_tokenizer(path)


def unpadded_logits(model, tokenizer, text, add_special_tokens=True):
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=add_special_tokens)])
    with torch.no_grad():
        return ids[0], model(input_ids=ids).logits[0].float()


# The Math-Shepherd input of the first two examples, written out by hand.
SHEPHERD_TEXTS = [
    "What is 3+4? 3+4=7. ки\nSo \\boxed{7}. ки",
    "Compute 12 - 5, then double it. 12 - 5 = 7 ки\n7 × 2 = 14 ки\nThe answer is \\boxed{14}. ки",
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_step_tag_prm_reads_good_token_probability_at_each_tag(step_tag_prm, tiny_paths, padding_side):
    model, _ = step_tag_prm
    tok = models.load_tokenizer(str(tiny_paths["step_tag_prm"]))
    tok.padding_side = padding_side
    tag, good, bad = (tok.convert_tokens_to_ids(t) for t in ("ки", "+", "-"))
    prm = StepTagPRM(model, tok, batch_tokens=48)  # several batches, of unequal widths
    scores = prm(QUESTIONS, STEPS)
    assert [len(s) for s in scores] == [len(s) for s in STEPS]
    for text, steps, got in zip(SHEPHERD_TEXTS, STEPS, scores):
        ids, logits = unpadded_logits(model, tok, text)
        positions = [t for t in range(len(ids)) if ids[t] == tag]
        expected = [torch.softmax(logits[t, [good, bad]], -1)[0].item() for t in positions]
        assert len(positions) == len(steps)
        assert close(got, expected, 1e-5), (got, expected)


class FakeCausalLM(nn.Module):
    """Logits known in advance: at position p, logit[good] - logit[bad] = 0.1 * p + (0.5 if the input is the
    tag else -3), every other logit 0. Reading any other position, or using padded positions, shows. Built as a
    backbone whose one hidden feature is that number and an LM head that copies it to the good logit."""

    def __init__(self, vocab, tag, good, bad):
        super().__init__()
        self.tag = tag
        self.lm_head = nn.Linear(1, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[good] = 1.0

    @property
    def base_model(self):
        def backbone(input_ids, attention_mask, position_ids, **kwargs):
            hidden = 0.1 * position_ids + torch.where(input_ids == self.tag, 0.5, -3.0)
            return SimpleNamespace(last_hidden_state=hidden[..., None].float())
        return backbone

    def get_output_embeddings(self):
        return self.lm_head


def test_step_tag_prm_with_known_logits(step_tag_prm):
    _, tok = step_tag_prm
    tag, good, bad = (tok.convert_tokens_to_ids(t) for t in ("ки", "+", "-"))
    prm = StepTagPRM(FakeCausalLM(len(tok), tag, good, bad), tok)
    questions, steps = ["q", "a longer question"], [["a ки b", "c"], ["d"]]  # a tag inside a step is not an end
    scores = prm(questions, steps)
    texts = ["q a ки b ки\nc ки", "a longer question d ки"]
    tag_positions = [[t for t, i in enumerate(tok.encode(text)) if i == tag] for text in texts]
    ours = [tag_positions[0][1:], tag_positions[1]]  # row 0: skip the tag the step itself contains
    for got, positions in zip(scores, ours):
        expected = [1 / (1 + math.exp(-(0.1 * p + 0.5))) for p in positions]
        assert close(got, expected), (got, expected)


def test_step_tag_prm_errors_name_the_token(tiny_tokenizer, step_tag_prm):
    model, tok = step_tag_prm
    with pytest.raises(ValueError, match="step_tag 'ки'"):
        StepTagPRM(model, tiny_tokenizer)  # the policy tokenizer has no ки token
    with pytest.raises(ValueError, match="good_token 'good'"):
        StepTagPRM(model, tok, good_token="good")


def qwen_prm_text(question, assistant):
    """The Qwen2.5-Math-PRM input, written out by hand for the tiny chat template."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|im_end|>\n")


QWEN_PRM_ASSISTANT = [
    "3+4=7.<extra_0>So \\boxed{7}.<extra_0>",
    "12 - 5 = 7<extra_0>7 × 2 = 14<extra_0>The answer is \\boxed{14}.<extra_0>",
]


class TupleOutput(nn.Module):
    """Like the hub's remote-code Qwen2ForProcessRewardModel: returns a tuple whose first element is the logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return (self.inner(**kwargs).logits,)


@pytest.mark.parametrize("wrap", [False, True])
def test_token_classifier_prm_reads_class_one_at_each_separator(token_classifier_prm, wrap):
    model, tok = token_classifier_prm
    sep = tok.convert_tokens_to_ids("<extra_0>")
    prm = TokenClassifierPRM(TupleOutput(model) if wrap else model, tok, batch_tokens=96)
    scores = prm(QUESTIONS, STEPS)
    assert [len(s) for s in scores] == [len(s) for s in STEPS]
    for question, assistant, got in zip(QUESTIONS, QWEN_PRM_ASSISTANT, scores):
        ids, logits = unpadded_logits(model, tok, qwen_prm_text(question, assistant), add_special_tokens=False)
        expected = [torch.softmax(logits[t], -1)[1].item() for t in range(len(ids)) if ids[t] == sep]
        assert close(got, expected, 1e-5), (got, expected)


def test_token_classifier_prm_separator_in_text_and_errors(token_classifier_prm, tiny_tokenizer):
    model, tok = token_classifier_prm
    prm = TokenClassifierPRM(model, tok)
    scores = prm(["q <extra_0>"], [["a<extra_0>b", "c"]])  # stray separators are removed, not scored
    assert len(scores[0]) == 2
    with pytest.raises(ValueError, match="separator '<extra_0>'"):
        TokenClassifierPRM(model, tiny_tokenizer)  # no <extra_0> token in the policy tokenizer


def test_sequence_orm_is_sigmoid_of_the_last_token_logit(tiny_paths):
    path = str(tiny_paths["orm"])
    model, tok = models.load_model(path, "AutoModelForSequenceClassification"), models.load_tokenizer(path)
    orm = SequenceORM(model, tok, batch_size=2)
    responses = ["3+4=7, so \\boxed{7}.", "12 - 5 = 7 and 7 × 2 = 14.\n\n\\boxed{14}", "Yes."]
    got = orm(QUESTIONS, responses)
    expected = []
    for question, response in zip(QUESTIONS, responses):
        text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            expected.append(torch.sigmoid(model(input_ids=ids).logits[0, 0]).item())
    assert close(got, expected, 1e-5), (got, expected)
    # a known head: zero weights and bias 0.3 give sigmoid(0.3) for every response
    model.score = nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.fill_(0.3)
    assert close(orm(QUESTIONS, responses), [1 / (1 + math.exp(-0.3))] * 3)
    # without a chat template: question, newline, response
    tok.chat_template = None
    assert close(SequenceORM(model, tok)(["q"], ["r"]), [1 / (1 + math.exp(-0.3))])


# -------------------------------------------------------------------------------------------------
# Transforms
# -------------------------------------------------------------------------------------------------


def test_clip_rewards():
    assert close(clip_rewards(torch.tensor([0.9, 0.3, 0.6]), 0.5), [0.0, -0.2, 0.0])
    scores = torch.rand(50)
    assert (clip_rewards(scores, 0.3) <= 0).all()
    assert clip_rewards(torch.tensor([]), 0.5).shape == (0,)


def test_delta_rewards_hand_vectors():
    assert close(delta_rewards(torch.tensor([0.9, 0.8, 0.7, 0.6])), [0.1, 0.1, 0.7, 0.0])
    assert close(delta_rewards(torch.tensor([0.3, 0.8])), [0.3, 0.0])
    assert close(delta_rewards(torch.tensor([0.9])), [0.0])
    assert delta_rewards(torch.tensor([])).shape == (0,)


def test_delta_suffix_sums_telescope():
    """Delta telescopes: the rewards from any non-final step k on sum to s_k; from the final step, 0."""
    gen = torch.Generator().manual_seed(0)
    for k_steps in range(1, 9):
        scores = torch.rand(k_steps, generator=gen)
        out = delta_rewards(scores).tolist()
        for k in range(k_steps):
            suffix = sum(out[k:])
            assert math.isclose(suffix, scores[k].item() if k < k_steps - 1 else 0.0, abs_tol=1e-6)


def test_clip_delta_rewards():
    # clipped [0, -0.2, 0, -0.3] -> [0 - (-0.2), -0.2 - 0, 0 (second to last: its own value), 0 (last)]
    assert close(clip_delta_rewards(torch.tensor([0.9, 0.3, 0.6, 0.2]), 0.5), [0.2, -0.2, 0.0, 0.0])
    assert close(clip_delta_rewards(torch.tensor([0.2]), 0.5), [0.0])


def test_minform_rewards():
    """PURE's form on x = 2s - 1, by hand: the docstring's example, one step, no step, and the sum ~ 2 min s - 1."""
    w = [math.exp(-2.0), math.exp(2.0)]  # softmax(-x / 0.1) of x = [0.2, -0.2]
    expected = [0.2 * w[0] / sum(w), -0.2 * w[1] / sum(w)]
    assert close(minform_rewards(torch.tensor([0.6, 0.4]), 0.1), expected)
    assert close(expected, [0.003597, -0.196403], 1e-6)
    assert close(minform_rewards(torch.tensor([0.4]), 0.1), [-0.2])  # a bad step is penalised, not paid less
    assert minform_rewards(torch.tensor([]), 0.1).shape == (0,)
    scores = torch.tensor([0.8, 0.35, 0.9, 0.6, 0.7])
    assert math.isclose(minform_rewards(scores, 0.01).sum().item(), -0.3, abs_tol=1e-4)  # ~ 2 min s - 1, small T
    with pytest.raises(ValueError, match="minform-temperature"):
        minform_rewards(scores, 0.0)


def test_transform_steps_applies_each_transform_and_takes_registered_ones(monkeypatch):
    assert list(STEP_TRANSFORMS) == ["prm", "clip", "delta", "clip_delta", "minform"]
    scores = [[0.9, 0.8, 0.7, 0.6], [0.2], []]
    got = transform_steps(scores, "delta", CFG)
    assert [close(g, e) for g, e in zip(got, [[0.1, 0.1, 0.7, 0.0], [0.0], []])] == [True] * 3
    assert close(transform_steps(scores, "prm", CFG)[0], [0.9, 0.8, 0.7, 0.6])
    assert close(transform_steps(scores, "clip", CFG)[1], [-0.3])
    assert close(transform_steps(scores, "clip_delta", CFG)[0], [0.0, 0.0, 0.0, 0.0])
    assert all(t.shape == (0,) for t in transform_steps(scores, "success", CFG))
    assert all(t.shape == (0,) for t in transform_steps(scores, "orm", CFG))
    # a researcher's own transform is one dict entry
    monkeypatch.setitem(STEP_TRANSFORMS, "mine", lambda s, cfg: s - cfg.eta)
    assert close(transform_steps([[0.9, 0.1]], "mine", CFG)[0], [0.4, -0.4])
    monkeypatch.setitem(STEP_TRANSFORMS, "broken", lambda s, cfg: s.sum())
    with pytest.raises(ValueError, match="one reward per step"):
        transform_steps([[0.9, 0.1]], "broken", CFG)


@pytest.mark.parametrize("reward", ["delta", "orm"])
def test_rollout_rewards_apply_alpha_once_to_steps_and_orm_alike(reward):
    # Two responses of 4 and 3 tokens; hand-computed token rewards with alpha 0.5, beta 0.1.
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    ro = dict(success=torch.tensor([1.0, 0.0]), orm_scores=torch.tensor([0.8, 0.4]) if reward == "orm" else torch.zeros(2),
              step_scores=[[0.9, 0.6], [0.5]], step_ends=[[1, 3], [2]],
              old_logp=torch.tensor([[-1.0, -2, -1, -1], [-1, -1, -1, -9]]),
              ref_logp=torch.tensor([[-1.5, -2, -1, -1], [-1, -0.5, -1, -9]]), mask=mask)
    cfg = SimpleNamespace(reward=reward, alpha=0.5, beta=0.1, eta=0.5, minform_temperature=0.1)
    got = RolloutRewards.of_rollout(ro, cfg)
    kl = [[0.5, 0, 0, 0], [0, -0.5, 0, 0]]  # (old - ref) on the mask: k1, what of_rollout takes without kl=
    assert torch.allclose(got.kl, torch.tensor(kl))
    if reward == "delta":  # delta of [0.9, 0.6] -> [0.9, 0.0]; of [0.5] -> [0.0]
        expected = [[-0.05, 0.45, 0, 1.0], [0, 0.05, 0, 0]]
        assert close(got.step_rewards[0], [0.45, 0.0]) and close(got.steps[0], [0.9, 0.0])
    else:  # no step rewards; success + 0.5 * ORM on the last token
        expected = [[-0.05, 0, 0, 1.4], [0, 0.05, 0.2, 0]]
    assert torch.allclose(got.on_tokens(mask), torch.tensor(expected), atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Placement
# -------------------------------------------------------------------------------------------------


def test_place_rewards_docstring_example():
    placed = place_rewards(torch.tensor([1.0]), [torch.tensor([-0.1, -0.3, 0.0])], [[1, 3, 4]],
                           torch.tensor([[1, 1, 1, 1, 1, 0]]))
    assert close(placed, [[0.0, -0.1, 0.0, -0.3, 1.0, 0.0]])


def test_place_rewards_sums_and_positions():
    gen = torch.Generator().manual_seed(0)
    lengths = [6, 1, 9, 4]
    mask = torch.zeros(4, 10)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    success = torch.tensor([1.0, 0.0, 0.3, -0.2])
    step_ends = [[1, 1, 5], [0], [2, 4, 7, 8], []]  # row 0 has two steps on one token
    rewards_ = [torch.rand(len(e), generator=gen) - 0.5 for e in step_ends]
    placed = place_rewards(success, rewards_, step_ends, mask)
    for b in range(4):
        assert math.isclose(placed[b].sum().item(), success[b].item() + rewards_[b].sum().item(), abs_tol=1e-6)
        assert (placed[b, lengths[b]:] == 0).all()
        expected = torch.zeros(10)
        expected[lengths[b] - 1] += success[b]
        for i, r in zip(step_ends[b], rewards_[b]):
            expected[i] += r
        assert close(placed[b], expected)


def test_place_rewards_rejects_indices_outside_the_mask():
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"row 0 step end indices \[3\]"):
        place_rewards(torch.tensor([1.0]), [torch.tensor([0.1, 0.2])], [[1, 3]], mask)
    with pytest.raises(ValueError, match="2 step rewards but 1 step ends"):
        place_rewards(torch.tensor([1.0]), [torch.tensor([0.1, 0.2])], [[1]], mask)
    with pytest.raises(ValueError, match="no response token"):
        place_rewards(torch.tensor([1.0]), [torch.zeros(0)], [[]], torch.zeros(1, 4))
