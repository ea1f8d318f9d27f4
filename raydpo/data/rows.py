"""Row validation, prompt formatting and the train/eval split: pure Python, applied in Ray Data.

A bad row is data, not an error: it gets a drop reason and is counted, never raised.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIELDS = ("question", "response_j", "response_k")

# every reason a row can be dropped for, in the order they are checked
REASONS = ("bad_json", "missing_field", "null_field", "not_text", "empty_field", "chosen_equals_rejected", "too_long")
VALID = ""


def drop_reason(row: Any, max_chars: int) -> str:
    """The first reason ``row`` is unusable, or ``""`` if it is a valid preference pair."""
    if not isinstance(row, dict):
        return "bad_json"
    if any(f not in row for f in FIELDS):
        return "missing_field"
    values = [row[f] for f in FIELDS]
    if any(v is None for v in values):
        return "null_field"
    if any(not isinstance(v, str) for v in values):
        return "not_text"
    if any(not v.strip() for v in values):
        return "empty_field"
    if row["response_j"].strip() == row["response_k"].strip():
        return "chosen_equals_rejected"
    if sum(len(v) for v in values) > max_chars:
        return "too_long"
    return VALID


def parse_json_line(line: str) -> Any:
    """A JSONL line as an object, or a marker dict that `drop_reason` classes as ``bad_json``."""
    try:
        return json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None


def format_prompt(question: str, template: str) -> str:
    return template.format(question=question)


def is_eval(question: str, eval_fraction: float) -> bool:
    """Stable across processes and runs (unlike ``hash``): the same question always lands in
    the same split, so a question never leaks from train into eval."""
    h = int.from_bytes(hashlib.sha1(question.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < eval_fraction * 1_000_000


def encode_row(row: Any) -> str:
    """Serialise an arbitrary (possibly malformed) row so a typed Arrow column can carry it."""
    return json.dumps(row, ensure_ascii=False, default=str)
