"""From a response's text to reward numbers on its tokens.

Everything here is text -> numbers; nothing optimises. In the order a PPO step uses it:

1. Answer checking. `extract_boxed` takes the final answer out of a response; `AnswerChecker` compares whole
   rollouts with the gold answers in a pool of worker processes (math-verify, with a hard per-answer
   timeout), `is_correct` checks one pair. The success reward is 1 for a correct answer, else 0.
2. Steps. `split_steps` cuts a response into reasoning steps on a delimiter; `step_end_indices` finds the
   policy token that ends each of those steps, where its step reward goes.
3. Reward models. A PRM is any callable `prm(questions, steps) -> scores`, one score in [0, 1] per step (a
   rule-based step checker works too). Adapters for hub models: `StepTagPRM` (Math-Shepherd format),
   `TokenClassifierPRM` (Qwen2.5-Math-PRM format) and `SequenceORM` (one score per response).
4. Transforms (Gao et al., arXiv 2410.15115): step scores -> step rewards, one function per `--reward` in
   `STEP_TRANSFORMS`; `transform_steps` applies one to a rollout.
5. Placement. `place_rewards` puts the success reward and the step rewards on the [batch, response_len]
   token grid.
6. `RolloutRewards`: a rollout's reward in three parts (outcome, steps, KL), alpha applied once; ppo.py's
   advantage estimators combine them.

The `--reward` choices. The total reward is Correct + alpha * sum_k r_k (- the KL penalty), where s_k in
[0, 1] is the PRM's score of the prefix that ends with step k, k = 1..K, and r_k goes on step k's last token:

    success      no step rewards                     (Correct only)
    orm          no step rewards; Correct + alpha * ORM(question, response) on the last token
    prm          r_k = s_k
    clip         r_k = min(s_k - eta, 0)
    delta        r_k = s_k - s_{k+1} for k < K-1,  r_{K-1} = s_{K-1},  r_K = 0
    clip_delta   delta applied to the clipped scores c_k = min(s_k - eta, 0)
    minform      r_k = x_k * exp(-x_k / T) / sum_j exp(-x_j / T), x = 2s - 1   (PURE, arXiv 2504.15275)

eta is --eta, alpha --alpha and T --minform-temperature (not the sampling temperature).

To add your own, register a function of one response's step scores (a 1-D float tensor) and the run config
that returns one reward per step, then pass `--reward mine`:

    STEP_TRANSFORMS["mine"] = lambda scores, cfg: scores - cfg.eta   # e.g. PRM scores shifted by eta
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------
# 1. Answer checking
# -------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, nested braces handled; None when there is none.

    The last `\\boxed{` is the answer. If it never closes (a truncated or malformed response) the result is
    None: an earlier, complete box is not used, because the model moved on from it. Escaped braces `\\{`
    `\\}` do not count. The brace-less form `\\boxed 5` is not an answer (LaTeX would box only its first
    token, and models trained on MATH write braces).

        extract_boxed(r"so \\boxed{\\frac{1}{2}}.")   -> r"\\frac{1}{2}"
        extract_boxed(r"\\boxed{3} or \\boxed{4}")     -> "4"
        extract_boxed(r"\\boxed{3} or \\boxed{4")      -> None
        extract_boxed(r"\\boxed{}")                   -> ""
    """
    opening = None
    for opening in _BOXED.finditer(text):
        pass
    if opening is None:
        return None
    depth = 1
    i = opening.end()
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character: `\{` and `\}` are literal braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[opening.end():i]
        i += 1
    return None


def math_verify_equal(gold: str, answer: str) -> bool:
    """The default answer check: math-verify with both sides wrapped as inline math, gold first.

    Wrapping matters: bare `\\dfrac12`, `\\sqrt{2}/2` or `(1,2]` do not parse, and `1+x^2` parses as `1`.
    math-verify is not symmetric (a gold `x<3` accepts the answer `(-\\infty,3)`, not the reverse), so the
    order is fixed.
    It runs inside an `AnswerChecker` worker, on that process's main thread, where math-verify's own
    `signal.alarm` timeouts (5 s per parse and per comparison) work.
    """
    from math_verify import parse, verify

    return verify(parse("$" + gold + "$"), parse("$" + answer + "$"))


def _answer_worker(conn, verify_fn) -> None:
    """Worker process: announce readiness, then answer every (gold, answer) with (equal, error or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us on close()
    conn.send("ready")
    while True:
        try:
            gold, answer = conn.recv()
        except EOFError:  # the parent closed its end
            return
        try:
            conn.send((bool(verify_fn(gold, answer)), None))
        except Exception as err:  # a broken check must not take the worker down
            conn.send((False, f"{type(err).__name__}: {err}"))


def _worker_context():
    """forkserver where the OS has it, else spawn; never fork (the trainer has torch and tokenizer threads).

    The fork server imports this module and math-verify once; each worker is then forked from that clean,
    single-threaded process in milliseconds, so replacing a killed worker is cheap. (If some other code
    already started the fork server, workers still work: they import both on start-up instead.)
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "math_verify"])
        return context
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _main_script_hidden():
    """While a worker starts, make the main module look like an interactive session's (no file, no spec).

    multiprocessing re-imports the main script in every spawn or forkserver child so that objects pickled
    from it can be found. Our workers need nothing from it, and importing it breaks in the cases people
    use a grading function from: a script on stdin (`<stdin>` cannot be imported), `python -c`, a notebook,
    or an unguarded script (its top level would run again in every worker).
    """
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    task: tuple[int, str, str] | None = None  # (index in the batch, gold, answer) being checked
    deadline: float = 0.0


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class AnswerChecker:
    """A pool of worker processes that checks answers with a hard per-answer timeout.

        with AnswerChecker(num_workers=4, timeout=10.0) as checker:
            correct = checker(responses, golds)   # list[bool], one per response

    Each response's last `\\boxed{}` (see `extract_boxed`) is compared with its gold answer by
    `verify_fn(gold, answer)` (default: `math_verify_equal`). A response without a box, or with an empty
    one, is incorrect without a worker. An answer still running after `timeout` seconds is incorrect: its
    worker is killed (SIGKILL, so even a hang inside C code ends) and replaced, `timeouts` goes up by one
    and a warning is logged. math-verify's own 5 s limits catch most slow inputs first; this is the bound.

    The pool lives until `close()` (or the end of a `with` block, or interpreter exit) and is reused by
    every call, so a trainer creates one checker and calls it every step. `verify_fn` must be a picklable
    top-level function; tests pass one that sleeps to exercise the kill path. Workers never import the
    calling script (see `_main_script_hidden`), so the checker works from stdin, `python -c`, notebooks and
    scripts without an `if __name__ == "__main__":` guard; only a `verify_fn` defined in the main script
    makes them import it (it must be found there).
    """

    startup_timeout = 120.0  # seconds a fresh worker may take to import math-verify

    def __init__(
        self, num_workers: int = 2, timeout: float = 10.0, verify_fn: Callable[[str, str], bool] | None = None
    ):
        if num_workers < 1:
            raise ValueError(f"AnswerChecker: num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"AnswerChecker: timeout must be > 0 seconds, got {timeout}")
        self.num_workers = num_workers
        self.timeout = timeout
        self.verify_fn = verify_fn or math_verify_equal
        try:
            pickle.dumps(self.verify_fn)
        except Exception as err:
            raise TypeError(
                f"AnswerChecker: verify_fn {self.verify_fn!r} must be picklable (a top-level function), "
                "because it runs in worker processes"
            ) from err
        self.timeouts = 0
        self._startup_kills = 0  # workers killed by a signal before they were ready (replaced, up to a bound)
        self._context = _worker_context()
        self._workers: list[_Worker] = []
        self._closed = False
        atexit.register(self.close)
        self._start_missing_workers()  # start-up overlaps with whatever the caller does next

    def __call__(self, responses: list[str], golds: list[str]) -> list[bool]:
        """Check every response against its gold answer, in parallel; returns one bool per response."""
        if self._closed:
            raise RuntimeError("AnswerChecker: called after close()")
        if len(responses) != len(golds):
            raise ValueError(f"AnswerChecker: {len(responses)} responses but {len(golds)} gold answers")
        correct = [False] * len(responses)
        todo = deque()
        for index, (response, gold) in enumerate(zip(responses, golds)):
            answer = extract_boxed(response)
            if answer is not None and answer.strip():
                todo.append((index, gold, answer))
        if not todo:
            return correct

        self._start_missing_workers()
        try:
            while todo or any(w.task is not None for w in self._workers):
                for worker in [w for w in self._workers if w.ready and w.task is None]:
                    if not todo:
                        break
                    task = todo.popleft()
                    try:
                        worker.conn.send(task[1:])
                    except OSError:  # this idle worker died (killed by the OS?): the answer waits for a new one
                        todo.appendleft(task)
                        self._discard(worker)
                        continue
                    worker.task, worker.deadline = task, time.monotonic() + self.timeout
                self._start_missing_workers()
                self._wait_and_collect(correct)
        finally:
            # Only an exception (e.g. Ctrl-C) leaves answers in flight; those workers would answer the next
            # call with a stale result, so they go, and the next call starts fresh ones.
            for worker in [w for w in self._workers if w.task is not None]:
                self._discard(worker)
        return correct

    def _wait_and_collect(self, correct: list[bool]) -> None:
        """Wait for the next message or deadline; record results, start-ups, crashes and timeouts."""
        waiting = [w for w in self._workers if not w.ready or w.task is not None]
        deadlines = [w.deadline for w in waiting if w.task is not None]
        wait_for = max(0.0, min(deadlines) - time.monotonic()) if deadlines else self.startup_timeout
        arrived = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_for)
        if not arrived and not deadlines:
            raise RuntimeError(f"AnswerChecker: no worker process started within {self.startup_timeout:.0f} s")

        for worker in [w for w in waiting if w.conn in arrived]:
            try:
                message = worker.conn.recv()
            except EOFError:  # the process died: crashed, or was killed by the OS (out of memory)
                worker.process.join(timeout=1.0)
                if not worker.ready:
                    # Killed by a signal while importing (the OS, a user): start another, a few times at most.
                    # An exit code >= 0 is the worker's own error (e.g. an import failing): report it.
                    exitcode = worker.process.exitcode
                    if exitcode is not None and exitcode < 0 and self._startup_kills < 3 * self.num_workers:
                        self._startup_kills += 1
                        logger.warning("answer checker: a starting worker was killed (signal %d); starting another",
                                       -exitcode)
                        self._discard(worker)
                        continue
                    raise RuntimeError(
                        f"AnswerChecker: a worker process exited during start-up (exit code {exitcode}); see its "
                        "error output above"
                    ) from None
                index, gold, answer = worker.task
                logger.warning("answer checker: worker died (exit code %s) checking answer %s against gold %s; "
                               "counted incorrect", worker.process.exitcode, _short(answer), _short(gold))
                self._discard(worker)
                continue
            if message == "ready":
                worker.ready = True
                continue
            equal, error = message
            index, gold, answer = worker.task
            if error is not None:
                logger.warning("answer checker: verify_fn raised %s on answer %s, gold %s; counted incorrect",
                               error, _short(answer), _short(gold))
            correct[index] = equal
            worker.task = None

        now = time.monotonic()
        for worker in [w for w in self._workers if w.task is not None and now >= w.deadline]:
            index, gold, answer = worker.task
            self.timeouts += 1
            logger.warning("answer checker: timed out after %.1f s on answer %s, gold %s; counted incorrect "
                           "(%d timeouts so far)", self.timeout, _short(answer), _short(gold), self.timeouts)
            self._discard(worker)
        self._start_missing_workers()

    def _start_missing_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            parent_end, child_end = self._context.Pipe()
            process = self._context.Process(
                target=_answer_worker, args=(child_end, self.verify_fn), name="answer-checker", daemon=True
            )
            # A verify_fn defined in the main script must be found there: then the workers import it.
            in_main = getattr(self.verify_fn, "__module__", None) == "__main__"
            with contextlib.nullcontext() if in_main else _main_script_hidden():
                process.start()
            child_end.close()  # so that our end sees EOF when the worker dies
            self._workers.append(_Worker(process, parent_end))

    def _discard(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers.remove(worker)

    def close(self) -> None:
        """Kill the worker processes (they hold no state). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for worker in list(self._workers):
            self._discard(worker)
        atexit.unregister(self.close)

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared_checker: AnswerChecker | None = None


def is_correct(response: str, gold: str) -> bool:
    """Whether the response's last boxed answer equals `gold` (no box -> False), within bounded time.

    Uses a one-worker `AnswerChecker` shared by all calls (default 10 s timeout). To check a whole rollout,
    call an `AnswerChecker` with lists instead: it runs the answers in parallel.
    """
    global _shared_checker
    if _shared_checker is None:
        _shared_checker = AnswerChecker(num_workers=1)
    return _shared_checker([response], [gold])[0]


# -------------------------------------------------------------------------------------------------
# 2. Steps
# -------------------------------------------------------------------------------------------------


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """The response's steps: the text split on `delimiter`, each stripped, empty ones dropped.

        split_steps("Step 1: 3+4=7.\\n\\n\\n\\nSo \\\\boxed{7}\\n\\n") -> ["Step 1: 3+4=7.", "So \\\\boxed{7}"]
    """
    if not delimiter:
        raise ValueError("--step-delimiter must not be empty")
    return [part.strip() for part in text.split(delimiter) if part.strip()]


def step_end_indices(token_ids: list[int], tokenizer, delimiter: str = "\n\n") -> list[int]:
    """For a response's token ids, the index of the token that ends each step of `split_steps`.

    The text is `tokenizer.decode(token_ids, skip_special_tokens=True)` (so an EOS adds no text); split that
    same text for the PRM and there is one index here per step, in the same order. A step ends at the token
    that completes the delimiter after it, and the final step at the last token (the EOS, or the last token
    of a truncated response). Example with Qwen2's tokenizer, where `.\\n\\n` is one token but `7` and
    `\\n\\n` are two:

        text     "We get 7\\n\\nThus 14.\\n\\nDone" + EOS
        tokens   "We" " get" " " "7" "\\n\\n" "Thus" " " "1" "4" ".\\n\\n" "Done" <EOS>
        index     0     1     2   3    4      5     6   7   8     9      10     11
        steps    "We get 7", "Thus 14.", "Done"   ->   [4, 9, 11]

    Character offsets are mapped back to tokens exactly: a token "completes" character c when the text
    decoded from the tokens up to it agrees with the full text on its first c characters, which also holds
    when a multi-byte character spans several byte tokens. Indices never decrease; two steps can share a
    token only if one token holds a whole step. An empty response gives [].
    """
    if not delimiter:
        raise ValueError("--step-delimiter must not be empty")
    token_ids = [int(t) for t in token_ids]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    step_char_ends = _step_char_ends(text, delimiter)
    if not step_char_ends:
        return []
    token_char_ends = _token_char_ends(token_ids, tokenizer, text)
    indices = []
    for chars in step_char_ends[:-1]:
        lo = indices[-1] if indices else 0
        if token_char_ends is not None:
            indices.append(bisect.bisect_left(token_char_ends, chars, lo))
        else:
            indices.append(_first_token_completing(token_ids, tokenizer, text, chars, lo))
    indices.append(len(token_ids) - 1)
    return indices


def _step_char_ends(text: str, delimiter: str) -> list[int]:
    """The character position just after the delimiter that follows each step of `split_steps(text, delimiter)`.

        _step_char_ends("a\\n\\n\\n\\nb", "\\n\\n") -> [3, 8]   (the empty part between is no step)
    """
    ends = []
    position = 0
    for part in text.split(delimiter):
        position += len(part)
        if part.strip():
            ends.append(position + len(delimiter))
        position += len(delimiter)
    return ends


def _token_char_ends(token_ids: list[int], tokenizer, text: str) -> list[int] | None:
    """The number of characters of `text` decoded by tokens 0..i, for each token i, when that is exact; else None.

    It is exact when the tokens decoded one by one concatenate to the text (byte-level BPE with no character
    split across tokens): token i then ends at the running sum of the piece lengths. The Rust tokenizer
    behind a fast HF tokenizer decodes the pieces ~20x faster than `batch_decode`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pieces = backend.decode_batch([[t] for t in token_ids], skip_special_tokens=True)
    else:
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]
    if "".join(pieces) != text:
        return None
    return list(itertools.accumulate(len(piece) for piece in pieces))


def _first_token_completing(token_ids: list[int], tokenizer, text: str, chars: int, lo: int) -> int:
    """The first token index >= lo whose decoded prefix agrees with `text` on its first `chars` characters.

    A binary search on decoded prefixes. A prefix that ends inside a multi-byte character decodes to a
    replacement character there, so it does not yet agree with the text at that position.
    """
    hi = len(token_ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(token_ids[: mid + 1], skip_special_tokens=True).startswith(text[:chars]):
            hi = mid
        else:
            lo = mid + 1
    return lo


# -------------------------------------------------------------------------------------------------
# 3. Reward models
# -------------------------------------------------------------------------------------------------


def _single_token_id(tokenizer, text: str, role: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{role} {text!r} is {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)} in the reward "
            "model's tokenizer; it must be exactly one token (check the PRM's tag/token settings)"
        )
    return ids[0]


@torch.no_grad()
def _forward_logits(model, encoding) -> torch.Tensor:
    """Run a reward model on a padded batch; returns its logits (first output), on the model's device.

    Position ids come from the attention mask, so a left-padded row sees the same positions as unpadded.
    Hub models with their own code may return a tuple whose first element is the logits: both are accepted.
    """
    device = next(model.parameters()).device
    mask = encoding["attention_mask"]
    output = model(
        input_ids=encoding["input_ids"].to(device),
        attention_mask=mask.to(device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
        use_cache=False,
    )
    return output.logits if hasattr(output, "logits") else output[0]


def _length_sorted_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Row indices in batches, longest first, each holding rows x its longest row <= batch_tokens padded tokens
    (a row longer than that on its own): similar lengths share a batch, so little is spent on padding.

        _length_sorted_batches([3, 9, 4, 8], batch_tokens=18) -> [[1, 3], [2, 0]]
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class StepTagPRM:
    """A causal-LM PRM in the Math-Shepherd format (`peiyi9979/math-shepherd-mistral-7b-prm`).

    Input: `question + " " + "step 1 ки\\nstep 2 ки\\n...step K ки"`. Score of step k: softmax over the
    logits of the good and bad tokens at the k-th tag position, P(good). Only those two logits are computed:
    the backbone's hidden states at the tag positions times the two rows of the LM head (no [B, T, vocab]
    tensor; a PRM whose logits are more than a linear head, e.g. soft-capped, needs its own adapter). Each of
    `step_tag`, `good_token` and `bad_token` is encoded alone (no special tokens) and must be one token.
    Mistral's sentencepiece tokenizer gives a lone `+` its word-start marker, as the card's `encode("+ -")[1:]`
    does; the card's ids are `+` 648, `-` 387, `ки` 12902, so compare `prm.good_id, prm.bad_id, prm.tag_id`
    when switching PRMs (not checkable offline). A byte-level PRM trained with labels after a space wants
    `good_token=" +"`. The tag positions are the tokens that end the tags this adapter inserted (found by
    character offsets, so a tag-like string inside a step is never read). Responses are scored in batches of
    similar length holding at most `batch_tokens` padded tokens.

        prm = StepTagPRM(model, tokenizer)
        prm(["What is 3+4?"], [["3+4=7", "\\\\boxed{7}"]])   -> e.g. [[0.93, 0.88]]
    """

    def __init__(self, model, tokenizer, step_tag: str = "ки", good_token: str = "+", bad_token: str = "-",
                 batch_tokens: int = 8192):
        if not tokenizer.is_fast:
            raise ValueError("StepTagPRM needs a fast tokenizer (character offsets locate the step tags)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.step_tag = step_tag
        self.tag_id = _single_token_id(tokenizer, step_tag, "StepTagPRM step_tag")
        self.good_id = _single_token_id(tokenizer, good_token, "StepTagPRM good_token")
        self.bad_id = _single_token_id(tokenizer, bad_token, "StepTagPRM bad_token")
        self.batch_tokens = batch_tokens

    def __call__(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        if len(questions) != len(steps):
            raise ValueError(f"StepTagPRM: {len(questions)} questions but {len(steps)} step lists")
        scores: list[list[float]] = [[] for _ in questions]
        rows = [b for b in range(len(questions)) if steps[b]]  # a response without steps has nothing to score
        encoded = [self.encode(*step_tag_text(questions[b], steps[b], self.step_tag), b) for b in rows]
        for batch in _length_sorted_batches([len(ids) for ids, _ in encoded], self.batch_tokens):
            padded, at = self.pad([encoded[i] for i in batch])
            with torch.no_grad():
                p_good = tag_logits(self.model, padded, at, [self.good_id, self.bad_id]).float().softmax(-1)
            p_good = p_good[:, 0].tolist()
            for i in batch:
                n = len(encoded[i][1])
                scores[rows[i]], p_good = p_good[:n], p_good[n:]
        return scores

    def encode(self, text: str, ends: list[int], row) -> tuple[list[int], list[int]]:
        """(token ids, the token index that ends each tag) of a text whose tags end at characters `ends` (by
        character offset, so a tag-like string inside a step is never read); a tag merged with its neighbours
        is an error naming `row`."""
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        token_at_char_end = {end: t for t, (_, end) in enumerate(encoding["offset_mapping"])}
        positions = [token_at_char_end.get(end) for end in ends]
        if any(t is None or encoding["input_ids"][t] != self.tag_id for t in positions):
            raise ValueError(f"StepTagPRM: the step tag {self.step_tag!r} merged with neighbouring text in row {row} "
                             "and is not one token there; choose a tag the tokenizer keeps separate")
        return list(encoding["input_ids"]), positions

    def pad(self, encoded: list[tuple[list[int], list[int]]]) -> tuple[dict, list[tuple[int, int]]]:
        """A padded batch of `encode` outputs and the (row, column) of every tag in it, row by row."""
        padded = self.tokenizer.pad([{"input_ids": ids} for ids, _ in encoded], return_tensors="pt")
        width = padded["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        at = [(row, t + (width - len(ids) if left else 0)) for row, (ids, tags) in enumerate(encoded) for t in tags]
        return padded, at


def step_tag_text(question: str, steps: list[str], step_tag: str = "ки") -> tuple[str, list[int]]:
    """The Math-Shepherd input of a response and the character index just past each tag:

        step_tag_text("1+1?", ["1+1=2", "\\boxed{2}"]) -> ("1+1? 1+1=2 ки\n\\boxed{2} ки", [13, 26])
    """
    text, ends = question + " ", []
    for k, step in enumerate(steps):
        text += ("\n" if k else "") + step + " " + step_tag
        ends.append(len(text))
    return text, ends


def tag_logits(model, padded: dict, at: list[tuple[int, int]], label_ids: list[int]) -> torch.Tensor:
    """The logits of the label tokens (good, bad) at the (row, column) pairs `at` of a padded batch of a causal LM:
    [len(at), len(label_ids)], the backbone's hidden states there times those rows of the LM head (no [B, T, vocab]
    tensor). Gradients flow when called with them (prm.py trains through it)."""
    device = next(model.parameters()).device
    mask = padded["attention_mask"]
    hidden = model.base_model(input_ids=padded["input_ids"].to(device), attention_mask=mask.to(device),
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                              use_cache=False).last_hidden_state  # [B, T, H]
    rows, columns = zip(*at)
    head = model.get_output_embeddings()
    logits = hidden[list(rows), list(columns)] @ head.weight[label_ids].T  # [N, 2]
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[label_ids]
    return logits


class TokenClassifierPRM:
    """A token-classification PRM in the Qwen2.5-Math-PRM format (`Qwen/Qwen2.5-Math-PRM-7B`).

    Input: the chat template with `system_prompt` (None: no system message), the question as the user turn
    and the assistant turn `step 1<extra_0>step 2<extra_0>...step K<extra_0>`. Score of step k: softmax over
    the two classes at the k-th separator, P(class 1). The model returns logits [B, T, 2] either as
    `.logits` (transformers' token classifiers) or as the first element of a tuple (the hub's own
    `Qwen2ForProcessRewardModel`, loaded with --trust-remote-code). A separator string inside the question
    or a step is removed first, so every separator token is one this adapter placed.
    """

    def __init__(
        self,
        model,
        tokenizer,
        separator: str = "<extra_0>",
        system_prompt: str | None = "Please reason step by step, and put your final answer within \\boxed{}.",
        batch_tokens: int = 8192,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.separator = separator
        self.separator_id = _single_token_id(tokenizer, separator, "TokenClassifierPRM separator")
        self.system_prompt = system_prompt
        self.batch_tokens = batch_tokens

    def __call__(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        if len(questions) != len(steps):
            raise ValueError(f"TokenClassifierPRM: {len(questions)} questions but {len(steps)} step lists")
        sep = self.separator
        scores: list[list[float]] = [[] for _ in questions]
        rows = [b for b in range(len(questions)) if steps[b]]
        texts = []
        for b in rows:
            system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
            messages = system + [
                {"role": "user", "content": questions[b].replace(sep, "")},
                {"role": "assistant", "content": "".join(step.replace(sep, "") + sep for step in steps[b])},
            ]
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        encodings = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for batch in _length_sorted_batches([len(ids) for ids in encodings], self.batch_tokens):
            encoding = self.tokenizer.pad({"input_ids": [encodings[i] for i in batch]}, return_tensors="pt")
            p_good = _forward_logits(self.model, encoding).float().softmax(-1)[..., 1].cpu()  # [B, T]
            at_separator = (encoding["input_ids"] == self.separator_id) & encoding["attention_mask"].bool()
            for row, i in enumerate(batch):
                positions = at_separator[row].nonzero().squeeze(-1)
                if len(positions) != len(steps[rows[i]]):
                    raise ValueError(
                        f"TokenClassifierPRM: row {rows[i]} has {len(steps[rows[i]])} steps but {len(positions)} "
                        f"{sep!r} tokens after the chat template"
                    )
                scores[rows[i]] = p_good[row, positions].tolist()
        return scores


class SequenceORM:
    """An outcome reward model: a sequence classifier with one logit; score = sigmoid(logit) in [0, 1].

    Input: the chat template with the question as the user turn and the response as the assistant turn
    when the tokenizer has a template, else `question + "\\n" + response`.

        orm = SequenceORM(model, tokenizer)
        orm(["What is 3+4?"], ["3+4=7, so \\\\boxed{7}"])   -> e.g. [0.81]
    """

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def __call__(self, questions: list[str], responses: list[str]) -> list[float]:
        if len(questions) != len(responses):
            raise ValueError(f"SequenceORM: {len(questions)} questions but {len(responses)} responses")
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        scores: list[float] = []
        for start in range(0, len(questions), self.batch_size):
            pairs = list(zip(questions, responses))[start:start + self.batch_size]
            if templated:
                texts = [
                    self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": q}, {"role": "assistant", "content": r}], tokenize=False
                    )
                    for q, r in pairs
                ]
            else:
                texts = [q + "\n" + r for q, r in pairs]
            encoding = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
            logits = _forward_logits(self.model, encoding).float().cpu()
            if logits.numel() != len(pairs):
                raise ValueError(f"SequenceORM: the model must return one logit per sequence, got shape "
                                 f"{tuple(logits.shape)} for {len(pairs)} sequences")
            scores += torch.sigmoid(logits.reshape(-1)).tolist()
        return scores


# -------------------------------------------------------------------------------------------------
# 4. Transforms: one response's step scores [K] -> step rewards [K]
# -------------------------------------------------------------------------------------------------


def clip_rewards(scores: torch.Tensor, eta: float) -> torch.Tensor:
    """Clip: r_k = min(s_k - eta, 0). Every reward is <= 0, so an extra step never pays.

        clip_rewards(tensor([0.9, 0.3, 0.6]), eta=0.5) -> tensor([0.0, -0.2, 0.0])
    """
    return (scores - eta).clamp(max=0.0)


def delta_rewards(scores: torch.Tensor) -> torch.Tensor:
    """Delta: r_k = s_k - s_{k+1} for k <= K-3, r_{K-2} = s_{K-2}, r_{K-1} = 0 (0-based, K steps).

    The last step's score is dropped (the success reward judges the last step), and the rewards from any
    step k <= K-2 on sum to s_k, so the return is bounded whatever the length.

        delta_rewards(tensor([0.9, 0.8, 0.7, 0.6])) -> tensor([0.1, 0.1, 0.7, 0.0])
        delta_rewards(tensor([0.9]))                -> tensor([0.0])
        delta_rewards(tensor([]))                   -> tensor([])
    """
    rewards = torch.zeros_like(scores)
    if len(scores) >= 2:
        rewards[:-2] = scores[:-2] - scores[1:-1]
        rewards[-2] = scores[-2]
    return rewards


def clip_delta_rewards(scores: torch.Tensor, eta: float) -> torch.Tensor:
    """Clip-Delta: Delta of the clipped scores (the paper's best variant).

        clip_delta_rewards(tensor([0.9, 0.3, 0.6, 0.2]), eta=0.5)
          clipped [0.0, -0.2, 0.0, -0.3] -> tensor([0.2, -0.2, 0.0, 0.0])
    """
    return delta_rewards(clip_rewards(scores, eta))


def minform_rewards(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """PURE's min-form credit assignment (arXiv 2504.15275): r_k = x_k * softmax(-x / T)_k with x_k = 2 s_k - 1.

    x = p(+) - p(-) = 2p - 1 moves the score to [-1, 1], so a step the PRM thinks wrong is penalised (on p in
    [0, 1] it would only pay less). The weights concentrate on the lowest step as T -> 0, so the rewards sum to
    about min_k x_k = 2 min_k s_k - 1.

        minform_rewards(tensor([0.6, 0.4]), temperature=0.1)
          x = [0.2, -0.2], weights softmax([-2, 2]) = [0.017986, 0.982014] -> tensor([0.003597, -0.196403])
          (sum -0.1928, about min x = -0.2)
    """
    if not temperature > 0:
        raise ValueError(f"--minform-temperature must be > 0, got {temperature}")
    x = 2 * scores - 1
    return x * torch.softmax(-x / temperature, dim=0)


# `cfg` is any object with the attributes `eta` and `minform_temperature` (ppo.py passes its config).
STEP_TRANSFORMS: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "prm": lambda scores, cfg: scores,
    "clip": lambda scores, cfg: clip_rewards(scores, cfg.eta),
    "delta": lambda scores, cfg: delta_rewards(scores),
    "clip_delta": lambda scores, cfg: clip_delta_rewards(scores, cfg.eta),
    "minform": lambda scores, cfg: minform_rewards(scores, cfg.minform_temperature),
}


def transform_steps(step_scores: list[list[float]], reward: str, cfg) -> list[torch.Tensor]:
    """STEP_TRANSFORMS[reward](scores, cfg) for each response, before alpha; empty tensors for `success` / `orm`.

        transform_steps([[0.9, 0.8, 0.7, 0.6]], "delta", cfg) -> [tensor([0.1, 0.1, 0.7, 0.0])]
    """
    if reward in ("success", "orm"):
        return [torch.zeros(0) for _ in step_scores]
    transformed = []
    for scores in step_scores:
        out = STEP_TRANSFORMS[reward](torch.tensor(scores, dtype=torch.float32), cfg)
        if out.shape != (len(scores),):
            raise ValueError(f"STEP_TRANSFORMS[{reward!r}] returned shape {tuple(out.shape)} for {len(scores)} "
                             "step scores; it must return one reward per step")
        transformed.append(out)
    return transformed


# -------------------------------------------------------------------------------------------------
# 5. Placement on the token grid
# -------------------------------------------------------------------------------------------------


def place_rewards(
    success: torch.Tensor,
    step_rewards: list[torch.Tensor],
    step_ends: list[list[int]],
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Token rewards [B, T]: success[b] on row b's last valid token, step k's reward at step_ends[b][k].

    success: [B] (already including alpha * ORM where used); step_rewards[b]: [K_b] (alpha-scaled);
    step_ends[b]: K_b token indices from `step_end_indices`; response_mask: [B, T], 1 on response tokens
    (up to and including the EOS). Rewards on the same token add up. Example, one row of 6 slots:

        response_mask  [1,    1,    1,    1,    1,   0]
        success        1.0                              -> on index 4, the last valid token
        step_ends      [1, 3, 4]   step_rewards [-0.1, -0.3, 0.0]
        result         [0.0, -0.1,  0.0, -0.3,  1.0, 0.0]
    """
    batch, width = response_mask.shape
    if not (len(success) == len(step_rewards) == len(step_ends) == batch):
        raise ValueError(f"place_rewards: batch sizes differ: success {len(success)}, step_rewards "
                         f"{len(step_rewards)}, step_ends {len(step_ends)}, response_mask {batch}")
    mask = response_mask.bool()
    rewards = torch.zeros(batch, width, dtype=torch.float32, device=response_mask.device)
    for b in range(batch):
        valid = mask[b].nonzero().squeeze(-1)
        if len(valid) == 0:
            raise ValueError(f"place_rewards: row {b} has no response token in response_mask")
        rewards[b, valid[-1]] += success[b].float()
        ends = torch.as_tensor(step_ends[b], dtype=torch.long, device=response_mask.device)
        values = step_rewards[b].to(device=response_mask.device, dtype=torch.float32)
        if ends.shape != values.shape:
            raise ValueError(f"place_rewards: row {b} has {len(values)} step rewards but {len(ends)} step ends")
        bad = [int(i) for i in ends if not (0 <= i < width and mask[b, i])]
        if bad:
            raise ValueError(f"place_rewards: row {b} step end indices {bad} are outside its response mask "
                             f"(valid tokens {valid[0].item()}..{valid[-1].item()})")
        rewards[b].index_add_(0, ends, values)  # index_add_ sums rewards that share a token
    return rewards


# -------------------------------------------------------------------------------------------------
# 6. A rollout's reward in three parts
# -------------------------------------------------------------------------------------------------


@dataclass
class RolloutRewards:
    """The reward of B responses (T = the widest), kept in three parts until an advantage estimator
    combines them; alpha is applied here, once, to the ORM score and to the step rewards alike.

        outcome    [B]      success + alpha * ORM score, paid on each response's last token
        steps      [K_b]    per response: its transformed step scores u before alpha (`transform_steps`)
        step_ends  K_b ints per response: the token that ends each step, where alpha * u is paid
        kl         [B, T]   KL penalty per token before beta (0 off the mask); reward -beta * kl
    """

    outcome: torch.Tensor
    steps: list[torch.Tensor]
    step_ends: list[list[int]]
    kl: torch.Tensor
    alpha: float
    beta: float

    @classmethod
    def of_rollout(cls, rollout, cfg, kl: torch.Tensor | None = None) -> "RolloutRewards":
        """From a scored rollout (ppo.Rollout, or a mapping with the same names: `success`, `orm_scores` [B],
        `step_scores`, `step_ends`, `old_logp`, `ref_logp`, `mask`); cfg gives the reward name, alpha, beta and
        the transforms' parameters. `kl` [B, T] is the per-token KL penalty before beta (ppo.py passes the
        --kl-estimator's, or zeros when the KL is in the loss); None means k1, old_logp - ref_logp."""
        field = rollout.__getitem__ if isinstance(rollout, Mapping) else rollout.__getattribute__
        steps = transform_steps(field("step_scores"), cfg.reward, cfg)
        ends = field("step_ends") if cfg.reward in STEP_TRANSFORMS else [[] for _ in steps]
        if kl is None:
            kl = (field("old_logp") - field("ref_logp")) * field("mask")
        outcome = field("success") + cfg.alpha * field("orm_scores")
        return cls(outcome=outcome, steps=steps, step_ends=ends, kl=kl, alpha=cfg.alpha, beta=cfg.beta)

    @property
    def step_rewards(self) -> list[torch.Tensor]:
        """alpha * u per response: what each step pays."""
        return [self.alpha * u for u in self.steps]

    def on_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """The summed token reward r [B, T]: outcome on the last token, step rewards on their end tokens,
        -beta * kl everywhere. mask: [B, T], 1 on response tokens."""
        return place_rewards(self.outcome, self.step_rewards, self.step_ends, mask) - self.beta * self.kl
