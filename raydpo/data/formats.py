"""Preference-data formats: renaming columns, telling a source's format from its first rows,
checking message lists, and finding the prompt a chosen/rejected pair shares. Pure Python.

The formats (`raydpo.config.DATA_FORMATS`), by the canonical columns each row has:

* ``stack_exchange`` — ``question``, ``response_j`` (chosen), ``response_k`` (rejected);
* ``standard`` — TRL's standard preference rows: ``prompt``, ``chosen``, ``rejected`` strings;
* ``conversational`` — the same keys, each a list of ``{"role", "content"}`` messages;
* ``implicit_prompt`` — ``chosen`` and ``rejected`` only (whole conversations, or strings), whose
  shared beginning is the prompt (`extract_prompt`).

(`raydpo.config` holds the names, `DATA_FORMATS` and `CANONICAL_COLUMNS`, for validation; `FIELDS`
here is their one spelling of which columns each format has, and a test keeps the two equal.)

``data.columns`` maps canonical names to a dataset's own (``{"prompt": "instruction"}``); rows are
renamed (`rename`) before anything else looks at them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FIELDS = {
    "stack_exchange": ("question", "response_j", "response_k"),
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
}
ROLES = ("system", "user", "assistant", "tool")
# TRL's apply_chat_template: a prompt ending with a user/tool turn gets the generation prompt, one
# ending with an assistant turn is continued; any other last role (system) has no defined rendering
PROMPT_LAST_ROLES = ("user", "tool", "assistant")
PEEK_ROWS = 1000  # rows `detect` looks at, at most, before giving up
KNOWN = ("stack_exchange (question, response_j, response_k), standard (prompt, chosen, rejected: strings), "
         "conversational (prompt, chosen, rejected: message lists), implicit_prompt (chosen, rejected)")


class FormatError(ValueError):
    """No row of a source matches a known format."""


def rename(row: Any, columns: Mapping[str, str] | None) -> Any:
    """``row`` with its ``columns`` values renamed to their canonical keys (a non-dict as is)."""
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for canonical, col in columns.items():
        if col in row:
            out[canonical] = row[col]
    return out


def format_of(row: Any) -> str | None:
    """The format a single (renamed) row looks like, or None.

    question/response_j/response_k -> stack_exchange; prompt/chosen/rejected -> conversational
    when prompt and chosen are both message lists, standard when both are strings, and
    implicit_prompt when they differ (TRL's ``maybe_extract_prompt``: a plain-text prompt column
    beside whole conversations is not the prompt); chosen/rejected alone -> implicit_prompt.
    Values of other types (null, numbers) make the row inconclusive."""
    if not isinstance(row, dict):
        return None
    if all(k in row for k in FIELDS["stack_exchange"]):
        return "stack_exchange"
    if not all(k in row for k in FIELDS["implicit_prompt"]):
        return None
    chosen = row["chosen"]
    if not isinstance(chosen, (str, list)):
        return None
    if "prompt" not in row:
        return "implicit_prompt"
    prompt = row["prompt"]
    if not isinstance(prompt, (str, list)):
        return None
    if isinstance(prompt, list) and isinstance(chosen, list):
        return "conversational"
    if isinstance(prompt, str) and isinstance(chosen, str):
        return "standard"
    return "implicit_prompt"


def first_match(rows: Iterable[Any], columns: Mapping[str, str] | None = None,
                limit: int = PEEK_ROWS) -> tuple[str, dict] | None:
    """``(format, row)`` of the first of ``rows`` (at most ``limit``, renamed) that looks like a
    format (`format_of`): deterministic, and it stops there, so a source's rows are read only as
    far as needed.

    None when no row is even a JSON object (nothing to go by: an empty or wholly malformed
    source); `FormatError` naming the columns seen and the known formats when objects were seen
    but none matches."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if i >= limit:
            break
        row = rename(row, columns)
        fmt = format_of(row)
        if fmt is not None:
            return fmt, row
        if isinstance(row, dict):
            seen.update(str(k) for k in row)
    if not seen:
        return None
    shown = ", ".join(sorted(seen)[:20]) + (f" (+{len(seen) - 20} more)" if len(seen) > 20 else "")
    raise FormatError(f"no known data format in the columns of its first rows ({shown}); known formats: {KNOWN}; "
                      "set data.columns to rename columns (e.g. {prompt: instruction}) or data.format")


def detect(rows: Iterable[Any], columns: Mapping[str, str] | None = None, limit: int = PEEK_ROWS) -> str | None:
    """The format of `first_match`, or None."""
    found = first_match(rows, columns, limit)
    return found[0] if found else None


# -- message lists ----------------------------------------------------------------------------

def encodable(s: str) -> bool:
    """Whether ``s`` encodes as UTF-8 (JSON's lone-surrogate escapes do not)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def normalize(messages: list[dict]) -> list[dict]:
    """Messages without their null-valued keys, as ``apply_chat_template`` normalizes them (Arrow
    gives every message of a column every key seen in it, null where absent)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def messages_reason(fields: list[Any]) -> str:
    """The first problem of a row's message lists, or ``""``: each check runs over every list
    before the next check, so a row's reason does not depend on which list holds which problem.

    ``not_messages`` (not a list of objects), ``empty_field`` (an empty list), ``bad_role`` (a
    role missing or not one of `ROLES`), ``not_text`` (content neither text nor null),
    ``bad_encoding`` (lone surrogates), ``empty_content`` (content missing, null or blank)."""
    if any(not isinstance(f, list) or any(not isinstance(m, dict) for m in f) for f in fields):
        return "not_messages"
    if any(not f for f in fields):
        return "empty_field"
    msgs = [m for f in fields for m in f]
    if any(m.get("role") not in ROLES for m in msgs):
        return "bad_role"
    contents = [m.get("content") for m in msgs]
    if any(c is not None and not isinstance(c, str) for c in contents):
        return "not_text"
    if any(c is not None and not encodable(c) for c in contents):
        return "bad_encoding"
    if any(c is None or not c.strip() for c in contents):
        return "empty_content"
    return ""


def messages_chars(fields: list[list[dict]]) -> int:
    return sum(len(m["content"]) for f in fields for m in f)


# -- implicit prompts -------------------------------------------------------------------------

def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any] | None:
    """``(prompt, chosen, rejected)`` with the shared beginning of ``chosen`` and ``rejected`` as
    the prompt — TRL's ``extract_prompt``, to the letter — or None when they share nothing.

    For strings and message lists alike: the prompt ends where the two first differ, one
    character (one message) earlier when a string prompt would end in a space (the space stays
    with the responses). When one is a prefix of the other, TRL's loop ends without finding a
    difference and the prompt stops one element short of the shorter one, so both responses keep
    at least that element."""
    n = min(len(chosen), len(rejected))
    idx = 0
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if idx == 0:  # TRL would read chosen[-1] here; nothing is shared
                return None
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    if idx == 0:
        return None
    return chosen[:idx], chosen[idx:], rejected[idx:]
