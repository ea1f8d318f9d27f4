"""Row validation, prompt formatting and the train/eval split: pure Python, no Ray.

Ray Data applies these inside ``map_batches`` (`raydpo.data.sources`); tests call them directly.
A bad row is data, not an error: it gets a drop reason and is counted, never raised.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIELDS = ("question", "response_j", "response_k")

# Every reason a row can be dropped for. Reading finds undecodable lines (bad_encoding) and
# unparseable ones (bad_json); `drop_reason` checks the parsed row in the order listed, except
# that text which cannot be UTF-8 encoded (lone surrogates) is bad_encoding right after not_text.
REASONS = (
    "bad_encoding",            # a JSONL line that is not valid UTF-8, or text with lone surrogates
    "bad_json",                # not parseable as JSON, or not a JSON object
    "missing_field",           # question / response_j / response_k absent
    "null_field",              # ... present but null
    "not_text",                # ... a number, list, object or bool instead of a string
    "empty_field",             # ... empty or whitespace only
    "chosen_equals_rejected",  # response_j == response_k (after stripping whitespace)
    "too_long",                # len(question + response_j + response_k) > max_chars
)
VALID = ""


def drop_reason(row: Any, max_chars: int) -> str:
    """The first reason ``row`` is unusable as a preference pair, or ``""`` (`VALID`)."""
    if not isinstance(row, dict):
        return "bad_json"
    if any(f not in row for f in FIELDS):
        return "missing_field"
    values = [row[f] for f in FIELDS]
    if any(v is None for v in values):
        return "null_field"
    if any(not isinstance(v, str) for v in values):
        return "not_text"
    if any(not _utf8(v) for v in values):  # lone surrogates from JSON "\ud800" escapes
        return "bad_encoding"
    if any(not v.strip() for v in values):
        return "empty_field"
    if row["response_j"].strip() == row["response_k"].strip():
        return "chosen_equals_rejected"
    if sum(len(v) for v in values) > max_chars:
        return "too_long"
    return VALID


_BAD = object()


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_json_line(line: str | bytes | None) -> Any:
    """A JSON text as a Python object; something `drop_reason` classes as ``bad_json`` (not a
    dict) when it does not parse."""
    if line is None:
        return _BAD
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _BAD


def decode_line(line: bytes) -> str | None:
    """A JSONL line as text, or None when it is not UTF-8 (then counted as ``bad_encoding``)."""
    try:
        return line.decode("utf-8").removesuffix("\r").removeprefix("\ufeff")  # CRLF files, a BOM
    except UnicodeDecodeError:
        return None


def format_prompt(question: str, template: str) -> str:
    """``template.format(question=question)`` — stack_llama_2's ``"Question: ...\\n\\nAnswer: "``."""
    return template.format(question=question)


def is_eval(question: str, eval_fraction: float) -> bool:
    """Whether a question belongs to the eval split.

    A function of the question text alone (sha1, not Python's salted ``hash``): stable across
    processes, runs and machines, needs no shuffle or global view (streaming-friendly), and a
    question asked twice always lands in the same split, so no question leaks from train into
    eval.
    """
    h = int.from_bytes(hashlib.sha1(question.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2.0**64 < eval_fraction


def encode_row(row: Any) -> str:
    """Serialise an arbitrary (possibly malformed) row as JSON text, so a string column can carry
    it past Arrow's type inference (non-JSON values such as datetimes become strings)."""
    return json.dumps(row, ensure_ascii=False, default=str)


def prepare_rows(rows: list[Any], max_chars: int, template: str, eval_fraction: float,
                 reasons: list[str] | None = None) -> dict[str, list]:
    """Validate, format and split parsed rows: the columns every source ends up with.

    ``reasons`` carries problems already found while reading (e.g. ``bad_encoding``); rows with
    one are not looked at again. Returns equal-length lists ``reason`` (``""`` = valid),
    ``prompt``, ``chosen``, ``rejected`` (empty strings for dropped rows) and ``is_eval``.
    """
    out: dict[str, list] = {"reason": [], "prompt": [], "chosen": [], "rejected": [], "is_eval": []}
    for i, row in enumerate(rows):
        reason = (reasons[i] if reasons else VALID) or drop_reason(row, max_chars)
        ok = reason == VALID
        out["reason"].append(reason)
        out["prompt"].append(format_prompt(row["question"], template) if ok else "")
        out["chosen"].append(row["response_j"] if ok else "")
        out["rejected"].append(row["response_k"] if ok else "")
        out["is_eval"].append(is_eval(row["question"], eval_fraction) if ok else False)
    return out
