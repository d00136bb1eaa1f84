"""Math problems with gold answers: the hub datasets, local files, prompt formatting, and a resumable order.

Every source ends up as the same row: `{"problem": str, "answer": str, "source": str}` plus `"subject"` and
`"level"` where the data has them. `answer` is the gold final answer (what `\\boxed{}` should contain), not a
worked solution:

    source         hub dataset (config)                        problem    gold answer
    gsm8k          openai/gsm8k (main)                         question   the number after "####", commas removed
    math           EleutherAI/hendrycks_math (7 subjects)      problem    the last \\boxed{} of `solution`
    math500        HuggingFaceH4/MATH-500 (test split only)    problem    `answer`
    mathinstruct   TIGER-Lab/MathInstruct (train split only)   instruction  chain-of-thought rows only: the last
                   (the paper's training questions)                         \\boxed{} or "The answer is X" of `output`
    a local file   .jsonl / .json (a list of rows) / .parquet  configurable field names (default problem / answer)

A value may mix sources: `load_problems("math,gsm8k", "train")`. The hub path and the local path share the
row parser, and a named source is just an entry of `SOURCES`: pointing its `hub_id` at a local folder in the
same layout (a dataset card with `configs:`, as on the hub) loads that folder through the same
`datasets.load_dataset` call; the tests do exactly this with the folders in `tests/fixtures/`.

`datasets` is imported only when a named source is loaded: local files need nothing beyond the standard
library (and `pyarrow` for .parquet).

Batching for training: `micro_batches` groups a rollout's rows, length-sorted, under a token budget, and
`collate` lays them out as a `MicroBatch` of [left-padded prompt | right-padded response] tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rewards import extract_boxed

logger = logging.getLogger(__name__)

# The system prompt of Qwen2.5-Math-Instruct for chain-of-thought answers (its model card and evaluation use it).
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# For tokenizers without a chat template (base models): the same instruction in plain text.
PLAIN_TEMPLATE = "Problem: {problem}\n\n{instruction}\n\nSolution:\n"

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSource:
    """Where a named source lives on the hub and how its rows read.

    answer_style: "gsm8k" (gold = the number after "####"), "boxed" (gold = the last \\boxed{} of the field)
    or "plain" (gold = the field itself). A row whose gold cannot be read that way is a bad row.
    """

    hub_id: str
    configs: tuple[str | None, ...]  # None: the dataset's only config
    splits: tuple[str, ...]
    problem_field: str
    answer_field: str
    answer_style: str


SOURCES: dict[str, HubSource] = {
    "gsm8k": HubSource("openai/gsm8k", ("main",), ("train", "test"), "question", "answer", "gsm8k"),
    "math": HubSource("EleutherAI/hendrycks_math", MATH_SUBJECTS, ("train", "test"), "problem", "solution", "boxed"),
    "math500": HubSource("HuggingFaceH4/MATH-500", (None,), ("test",), "problem", "answer", "plain"),
    # One JSON list, MathInstruct.json; rows pass through `MathInstructFilter` first (see there).
    "mathinstruct": HubSource("TIGER-Lab/MathInstruct", (None,), ("train",), "instruction", "output", "mathinstruct"),
}


class ProblemList(list):
    """A plain list of problem rows that also remembers how many bad rows were skipped to build it, and how
    many rows a source's filter dropped: `dropped[subset][reason]` (MathInstruct only, so far)."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.skipped = 0
        self.dropped: dict[str, dict[str, int]] = {}


class MathInstructFilter:
    """Keeps MathInstruct's chain-of-thought rows with a readable final answer, once per question.

    What the hub card says, unverified here (no hub access): each row has `instruction`, `output` and `source`,
    a path such as `data/CoT/gsm_rft.json` or `data/PoT/mathqa.json` that marks chain-of-thought (CoT) and
    program-of-thought (PoT) subsets. So the code is defensive: a row whose `source` names no CoT/PoT folder
    is treated as CoT, and the reasons below are counted per subset (`CoT/gsm_rft` for that path).

    Dropped, by reason: "program of thought" (the output is code, not a worked answer); "no final answer"
    (no \\boxed{} and no "The answer is ..." sentence); "unresolved choice" (the answer is a letter (A)-(E)
    that the question's "Answer Choices" do not resolve: a letter is replaced by its option's text, because
    the policy is asked for a value, not a letter); "duplicate question" (the same instruction seen before).
    """

    ANSWER_SENTENCE = re.compile(r"[Tt]he (?:final )?answer is[:\s]*(.+)")
    # "(B)", "B", "B)", "B:", "Option B", each perhaps followed by the option's text ("(B) 12 km")
    LETTER = re.compile(r"(?:[Oo]ption\s+)?(?:\(([A-E])\)|([A-E])(?:\)|[.:]|$))\s*(.*)", re.S)

    def __init__(self):
        self.seen: set[str] = set()
        self.kept: dict[str, int] = {}
        self.dropped: dict[str, dict[str, int]] = {}

    def rows(self, rows, problems: ProblemList):
        """The kept rows of a stream of (where, row, parser fields), each with its gold in `answer`; when the
        stream ends, what was dropped is logged and kept in `problems.dropped`."""
        for where, row, fields in rows:
            kept = self.keep(row)
            if kept is not None:
                yield where, kept, (fields[0], "answer", "plain")
        self.log(problems)

    def keep(self, row) -> dict | None:
        """The row with its gold answer in `answer`, or None (and the reason counted)."""
        if not isinstance(row, dict):
            return row  # parse_row reports it as a bad row
        path = Path(str(row.get("source") or ""))
        subset = f"{path.parent.name}/{path.stem}" if path.stem else "unknown"  # e.g. CoT/gsm_rft
        answer, reason = self.answer(row)
        question = str(row.get("instruction") or "").strip()
        if reason is None and question in self.seen:
            reason = "duplicate question"
        if reason is not None:
            self.dropped.setdefault(subset, {}).setdefault(reason, 0)
            self.dropped[subset][reason] += 1
            return None
        self.seen.add(question)
        self.kept[subset] = self.kept.get(subset, 0) + 1
        return {**row, "answer": answer}

    def answer(self, row: dict) -> tuple[str | None, str | None]:
        """(gold answer, None) or (None, reason)."""
        if "/PoT/" in "/" + str(row.get("source") or ""):
            return None, "program of thought"
        output = str(row.get("output") or "")
        answer = extract_boxed(output)
        if not answer:
            sentences = self.ANSWER_SENTENCE.findall(output)
            answer = sentences[-1].strip().rstrip(".").strip().strip("$").strip() if sentences else None
        if not answer:
            return None, "no final answer"
        choice = self.LETTER.fullmatch(answer)
        if choice:
            letter, answer = choice.group(1) or choice.group(2), choice.group(3).strip()
            instruction = str(row.get("instruction") or "")
            options = re.search(rf"\({letter}\)\s*(.+?)\s*(?=\([A-E]\)|\n|$)", instruction.split("Answer Choices", 1)[-1])
            if not answer and ("Answer Choices" not in instruction or not options):
                return None, "unresolved choice"
            answer = answer or options.group(1).strip()
        return answer, None

    def log(self, problems: ProblemList) -> None:
        """Log what was dropped, by subset and reason; warn for a subset that lost more than half its rows."""
        problems.dropped = self.dropped
        for subset in sorted(set(self.kept) | set(self.dropped)):
            lost = sum(self.dropped.get(subset, {}).values())
            total = lost + self.kept.get(subset, 0)
            if lost:
                reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped[subset].items()))
                level = logging.WARNING if lost * 2 > total else logging.INFO
                logger.log(level, "mathinstruct subset %s: dropped %d of %d rows (%s)%s", subset, lost, total,
                           reasons, "; more than half" if level == logging.WARNING else "")


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------


def load_problems(
    source: str,
    split: str = "train",
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    skip_bad_rows: bool = False,
) -> ProblemList:
    """Problems from a comma-separated mix of named sources (`SOURCES`) and local files, in the order given.

    `split` selects the split of named sources (a local file is one split, so it ignores it).
    `problem_field` / `answer_field` name the columns of local files; named sources know their own. In a
    local file, an answer containing "####" is read the GSM8K way, one containing \\boxed{} as a MATH
    solution, anything else as the gold answer itself; so raw GSM8K or MATH files load with the right field
    names (e.g. `problem_field="question"`, or `answer_field="solution"`).

    A row without a problem or a gold answer raises ValueError naming the file (or hub dataset) and the row;
    with `skip_bad_rows=True` it is skipped, and the count is logged and kept in `.skipped` of the result.
    """
    names = [part.strip() for part in source.split(",")]
    # Check every name before loading anything: a typo in the last one should not wait for a hub download.
    for name in names:
        if name in SOURCES:
            if split not in SOURCES[name].splits:
                raise ValueError(f"data source '{name}' ({SOURCES[name].hub_id}) has no split '{split}'; "
                                 f"it has {', '.join(SOURCES[name].splits)}")
        elif name.endswith(LOCAL_SUFFIXES):
            if not Path(name).is_file():
                raise FileNotFoundError(f"data source '{name}': no such file")
        else:
            raise ValueError(f"data source '{name}' (in '{source}'): not a named source ({', '.join(SOURCES)}) "
                             f"nor a local {' / '.join(LOCAL_SUFFIXES)} file")

    problems = ProblemList()
    for name in names:
        if name in SOURCES:
            rows = _hub_rows(name, SOURCES[name], split)
            if SOURCES[name].answer_style == "mathinstruct":
                rows = MathInstructFilter().rows(rows, problems)
        else:
            rows = _local_rows(Path(name), problem_field, answer_field)
        skipped_here, loaded_here, first_bad = 0, 0, None
        for where, row, fields in rows:
            try:
                problems.append(parse_row(row, *fields, source=name))
                loaded_here += 1
            except ValueError as err:
                if not skip_bad_rows:
                    raise ValueError(f"{where}: {err} (pass skip_bad_rows / --skip-bad-rows to skip such rows)") from None
                skipped_here += 1
                first_bad = first_bad or f"{where}: {err}"
        if skipped_here:
            logger.warning("data source '%s': skipped %d bad rows without a problem or a gold answer; the first: %s",
                           name, skipped_here, first_bad)
        if not loaded_here:
            raise ValueError(f"data source '{name}' (split '{split}'): no usable problems")
        problems.skipped += skipped_here
    return problems


def parse_row(row, problem_field: str, answer_field: str, answer_style: str, *, source: str) -> dict:
    """One raw row -> {"problem", "answer", "source", ["subject"], ["level"]}; ValueError says what is missing.

    Subject comes from a `subject` field (MATH-500) or a `type` field (hendrycks MATH); level from `level`,
    where "Level 3" and 3 both become the int 3 (a few MATH rows say "Level ?": kept as the string "?").
    """
    if not isinstance(row, dict):
        raise ValueError(f"not an object with fields: {str(row)[:60]!r}")
    problem = row.get(problem_field)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"no problem (field '{problem_field}' is {'missing or null' if problem is None else repr(problem)[:40]})")
    raw = row.get(answer_field)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(f"no gold answer (field '{answer_field}' is {'missing or null' if raw is None else 'empty'})")
    raw = str(raw)
    if answer_style == "auto":
        answer_style = "gsm8k" if "####" in raw else "boxed" if "\\boxed" in raw else "plain"
    if answer_style == "gsm8k":
        if "####" not in raw:
            raise ValueError(f"no gold answer (field '{answer_field}' has no '#### N' line)")
        answer = raw.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_style == "boxed":
        answer = extract_boxed(raw)
        if answer is None:
            raise ValueError(f"no gold answer (field '{answer_field}' has no complete \\boxed{{...}})")
        answer = answer.strip()
    else:
        answer = raw.strip()
    if not answer:
        raise ValueError(f"no gold answer (field '{answer_field}' gives an empty answer)")

    out = {"problem": problem, "answer": answer, "source": source}
    subject = row.get("subject", row.get("type"))
    if subject:
        out["subject"] = str(subject)
    level = row.get("level")
    if level is not None and level != "":
        text = str(level).removeprefix("Level ").strip()
        out["level"] = int(text) if text.isdigit() else text
    return out


def _hub_rows(name: str, spec: HubSource, split: str):
    """Yield (where, row, parser fields) for every row of a named source's split, over all its configs."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"data source '{name}' needs the `datasets` package (pip install datasets); "
                          "local .jsonl / .json / .parquet files do not") from err
    # datasets caches a local folder under its base name and does not notice edited files, so two fixture
    # folders both called "gsm8k", or a folder changed since the last run, would read stale rows: a local
    # folder gets a fresh throw-away cache. Hub datasets use the normal cache (keyed by hub revision).
    local_folder = Path(spec.hub_id).is_dir()
    for config in spec.configs:
        label = f"{spec.hub_id}" + (f" (config {config}, split {split})" if config else f" (split {split})")
        with tempfile.TemporaryDirectory() if local_folder else contextlib.nullcontext() as cache_dir:
            try:
                rows = datasets.load_dataset(spec.hub_id, config, split=split, cache_dir=cache_dir).to_list()
            except Exception as err:  # network, auth, missing config: all reported the same way
                raise RuntimeError(
                    f"data source '{name}': could not load {label} ({type(err).__name__}: {err}). "
                    "Without hub access, pass local .jsonl / .json / .parquet files instead."
                ) from err
        for index, row in enumerate(rows):
            yield f"{label} row {index}", row, (spec.problem_field, spec.answer_field, spec.answer_style)


def _local_rows(path: Path, problem_field: str, answer_field: str):
    """Yield (where, row, parser fields) for every row of a local .jsonl / .json / .parquet file.

    Blank lines of a .jsonl file are not rows; a line that is not valid JSON is a bad row.
    """
    fields = (problem_field, answer_field, "auto")
    if path.suffix == ".jsonl":
        index = 0
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = line.strip()  # parse_row reports the text as not an object
                yield f"{path} row {index} (line {line_no})", row, fields
                index += 1
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); JSON lines belong in a .jsonl file") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows, got {type(rows).__name__}")
        for index, row in enumerate(rows):
            yield f"{path} row {index}", row, fields
    else:
        try:
            import pyarrow.parquet
        except ImportError as err:
            raise ImportError(f"data source '{path}': reading .parquet needs pyarrow (pip install pyarrow)") from err
        for index, row in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
            yield f"{path} row {index}", row, fields


def tiny_problems(n: int = 32, seed: int = 0) -> list[dict]:
    """`n` one-operation arithmetic problems made in code, for the `tiny` preset and smoke tests.

    Example row: {"problem": "What is 7 + 5?", "answer": "12", "source": "tiny"}. Same (n, seed), same list.
    """
    rng = random.Random(f"tiny-{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"problem": f"What is {a} {op} {b}?", "answer": str(value), "source": "tiny"})
    return out


# -------------------------------------------------------------------------------------------------
# Prompts
# -------------------------------------------------------------------------------------------------


def format_prompt(tokenizer, problem: str) -> str:
    """The prompt text: the tokenizer's chat template with Qwen2.5-Math's system prompt, ending where the
    assistant's answer begins; `PLAIN_TEMPLATE` for tokenizers without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(problem=problem, instruction=SYSTEM_PROMPT)


def tokenize_prompts(tokenizer, problems: list[dict], max_prompt_tokens: int | None = None) -> tuple[list[dict], int]:
    """Format and tokenize every problem; drop those whose prompt is longer than `max_prompt_tokens`.

    Returns (kept, n_dropped): `kept` are copies of the problem rows with `"prompt"` (text) and `"prompt_ids"`
    (list of ints) added, in the input order. A chat template already writes every special token the model
    needs (e.g. a BOS), so prompts from one are encoded without adding special tokens; plain-template prompts
    get the tokenizer's usual ones.
    """
    if not problems:
        return [], 0
    texts = [format_prompt(tokenizer, p["problem"]) for p in problems]
    with_specials = not getattr(tokenizer, "chat_template", None)
    ids = tokenizer(texts, add_special_tokens=with_specials)["input_ids"]
    kept = [
        {**p, "prompt": text, "prompt_ids": list(prompt_ids)}
        for p, text, prompt_ids in zip(problems, texts, ids)
        if max_prompt_tokens is None or len(prompt_ids) <= max_prompt_tokens
    ]
    n_dropped = len(problems) - len(kept)
    if n_dropped:
        logger.warning("dropped %d of %d prompts longer than %d tokens", n_dropped, len(problems), max_prompt_tokens)
    return kept, n_dropped


# -------------------------------------------------------------------------------------------------
# Order
# -------------------------------------------------------------------------------------------------


class PromptSampler:
    """Batches of problems in a shuffled order fixed by the seed; every epoch is a fresh permutation.

    Every problem is drawn once per epoch; a batch that reaches the end of an epoch is completed from the
    next one. The position (`state_dict`, JSON-serialisable) is all a checkpoint needs to resume the exact
    order. Example: 5 problems, batch 2 -> [a, b], [c, d], [e | f'] where f' starts the second permutation.
    """

    def __init__(self, problems: list[dict], batch_size: int, seed: int):
        if not problems:
            raise ValueError("PromptSampler: no problems")
        if batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size must be >= 1, got {batch_size}")
        self.problems, self.batch_size, self.seed = problems, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        # A string seed is hashed with SHA-512 by `random`, so the order is the same on every Python version
        # and (seed, epoch) pairs never collide the way seed + epoch would.
        order = list(range(len(self.problems)))
        random.Random(f"prompt-order-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.problems[self._order[self.position]])
            self.position += 1
        return batch

    def _fingerprint(self) -> str:
        """A short hash of the problem texts, so a checkpoint cannot silently resume over other data."""
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(p["problem"].encode("utf-8") + b"\0")
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_problems": len(self.problems), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_problems", "fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(f"PromptSampler.load_state_dict: the checkpoint's data order was made with "
                                 f"{key} {state[key]!r}, this run has {mine[key]!r} (different data or seed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# -------------------------------------------------------------------------------------------------
# Micro-batches: length-sorted rows under a token budget
# -------------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """Rows of a rollout as [left-padded prompt (P columns) | right-padded response (R columns)] tensors,
    with the rollout's per-token fields cut to R columns ([n, R]; None where the rollout has none)."""

    rows: list[int]  # which rollout rows, in this order
    input_ids: torch.Tensor  # [n, P + R]
    attention_mask: torch.Tensor  # [n, P + R] 1 on prompt and response tokens
    position_ids: torch.Tensor  # [n, P + R] counting from each row's first prompt token
    prompt_width: int  # P
    mask: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def response_ids(self) -> torch.Tensor:
        """[n, R]"""
        return self.input_ids[:, self.prompt_width:]


PER_TOKEN_FIELDS = ("mask", "old_logp", "ref_logp", "values", "advantages", "returns")


def micro_batches(indices: list[int], prompt_lens: list[int], response_lens: list[int], token_budget: int) -> list[list[int]]:
    """Split rows into lists of row indices, sorted by length, so that rows * (widest prompt + widest response)
    <= budget. Sorting keeps similar lengths together, so the padding inside a micro-batch stays small."""
    order = sorted(indices, key=lambda i: (prompt_lens[i] + response_lens[i], i))
    chunks, current, p_max, r_max = [], [], 0, 0
    for i in order:
        p, r = max(p_max, prompt_lens[i]), max(r_max, response_lens[i])
        if current and (len(current) + 1) * (p + r) > token_budget:
            chunks.append(current)
            current, p, r = [], prompt_lens[i], response_lens[i]
        current.append(i)
        p_max, r_max = p, r
    if current:
        chunks.append(current)
    return chunks


def collate(rollout, rows: list[int], pad_id: int, device) -> MicroBatch:
    """Rows `rows` of a rollout (ppo.Rollout, or anything with `prompt_ids`, `response_ids` and optionally the
    per-token fields [B, R]) as a MicroBatch on `device`."""
    prompts = [rollout.prompt_ids[i] for i in rows]
    responses = [rollout.response_ids[i] for i in rows]
    P, R = max(len(p) for p in prompts), max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(rows), P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, P - len(p):P] = torch.tensor(p)
        input_ids[row, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[row, P - len(p):P + len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    per_token = {key: getattr(rollout, key, None) for key in PER_TOKEN_FIELDS}
    per_token = {key: value[rows, :R].to(device) for key, value in per_token.items() if value is not None}
    return MicroBatch(rows=rows, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      position_ids=position_ids.to(device), prompt_width=P, **per_token)


if __name__ == "__main__":
    # python data.py SOURCE [SPLIT]: how many problems a source gives, and what its filter dropped, by reason
    # and subset (e.g. `python data.py mathinstruct` for the paper's training set).
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        loaded = load_problems(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "train")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"data.py: {err}") from None
    print(f"{sys.argv[1]}: {len(loaded)} problems, {loaded.skipped} bad rows skipped")
    for subset, reasons in sorted(loaded.dropped.items()):
        for reason, count in sorted(reasons.items()):
            print(f"  dropped  {subset:<24} {reason:<20} {count}")
