"""Row validation, prompt formatting and the train/eval split: pure Python, no Ray.

Ray Data applies these inside ``map_batches`` (`raydpo.data.sources`); tests call them directly.
A bad row is data, not an error: it gets a drop reason and is counted, never raised.

Every format (`raydpo.data.formats`) ends in the same text columns: ``prompt``, ``chosen`` and
``rejected`` exactly as the model reads them (`to_pair`). Stack-exchange rows are formatted with
``data.prompt_template``, standard rows used as they are, message lists rendered with the chat
template (`raydpo.data.chat`) — those are ``templated``: the text carries the template's own
special tokens (BOS, end of turn), so tokenization adds none (`raydpo.data.tokenize`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from raydpo.data.formats import (FIELDS as FORMAT_FIELDS, PROMPT_LAST_ROLES, encodable, extract_prompt,
                                 messages_chars, messages_reason, normalize, rename)

FIELDS = FORMAT_FIELDS["stack_exchange"]

# Every reason a row can be dropped for; the first failing check is a row's one reason. Reading
# finds undecodable lines (bad_encoding) and unparseable ones (bad_json). Text fields are then
# checked (`drop_reason`) for missing, null, not_text, bad_encoding (lone surrogates), empty,
# chosen == rejected, too_long; message lists (`raydpo.data.formats.messages_reason`) for missing,
# null, not_messages, an empty list, bad_role, not_text, bad_encoding, empty_content, chosen ==
# rejected, too_long, then no_shared_prefix (implicit prompts), a prompt ending on a system turn
# (bad_role) and template_error.
REASONS = (
    "bad_encoding",            # a JSONL line that is not valid UTF-8, or text with lone surrogates
    "bad_json",                # not parseable as JSON, or not a JSON object
    "missing_field",           # a column of the row's format absent (after data.columns renaming)
    "null_field",              # ... present but null
    "not_messages",            # a message column that is not a list of {role, content} objects
    "not_text",                # a number, list, object or bool where text is expected (a message's content too)
    "empty_field",             # ... empty or whitespace only; an empty message list
    "bad_role",                # a message role missing or not system/user/assistant/tool; a prompt ending on system
    "empty_content",           # a message whose content is missing, null or whitespace only
    "chosen_equals_rejected",  # chosen == rejected after stripping whitespace (messages: roles and contents)
    "too_long",                # the row's own text (question/prompt + answers, messages' contents) > max_chars
    "no_shared_prefix",        # implicit prompt: chosen and rejected share no beginning to be the prompt
    "template_error",          # the chat template raised on the row (e.g. roles must alternate)
)
VALID = ""


class Pair(NamedTuple):
    """One row as the model reads it, or why it cannot be read (``reason``)."""

    reason: str
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""
    split_key: str = ""     # what the train/eval split hashes (`is_eval`)
    templated: bool = False  # rendered by a chat template: carries its own special tokens


def drop_reason(row: Any, max_chars: int, fields: tuple[str, ...] = FIELDS) -> str:
    """The first reason ``row`` is unusable as a preference pair of text ``fields`` (the last two
    are chosen and rejected; by default stack-exchange's), or ``""`` (`VALID`)."""
    if not isinstance(row, dict):
        return "bad_json"
    return _present(row, fields) or _texts_reason([row[f] for f in fields], max_chars)


def _present(row: dict, fields: tuple[str, ...]) -> str:
    if any(f not in row for f in fields):
        return "missing_field"
    if any(row[f] is None for f in fields):
        return "null_field"
    return VALID


def _texts_reason(values: list[Any], max_chars: int) -> str:
    if any(not isinstance(v, str) for v in values):
        return "not_text"
    if any(not encodable(v) for v in values):  # lone surrogates from JSON "\ud800" escapes
        return "bad_encoding"
    if any(not v.strip() for v in values):
        return "empty_field"
    if values[-2].strip() == values[-1].strip():
        return "chosen_equals_rejected"
    if sum(len(v) for v in values) > max_chars:
        return "too_long"
    return VALID


def _messages_reason(fields: list[Any], max_chars: int) -> str:
    reason = messages_reason(fields)
    if reason:
        return reason
    chosen, rejected = ([(m["role"], m["content"].strip()) for m in f] for f in fields[-2:])
    if chosen == rejected:
        return "chosen_equals_rejected"
    if messages_chars(fields) > max_chars:
        return "too_long"
    return VALID


def _rendered(renderer, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> Pair:
    if prompt[-1].get("role") not in PROMPT_LAST_ROLES:
        return Pair("bad_role")
    if renderer is None:  # message rows in a source whose first rows were plain text
        return Pair("template_error")
    try:
        p, c, r = renderer.pair(prompt, chosen, rejected)
    except Exception:  # noqa: BLE001 - a template's raise_exception, or a bad value it trips on
        return Pair("template_error")
    return Pair(VALID, p, c, r, split_key=p, templated=True)


def to_pair(row: Any, fmt: str, max_chars: int, template: str, renderer=None) -> Pair:
    """A renamed row of format ``fmt`` as prompt / chosen / rejected text, or its drop reason.

    ``template`` formats stack-exchange questions; ``renderer`` (a `raydpo.data.chat.ChatRenderer`)
    renders message lists. The split key is the prompt as rendered — for stack-exchange rows the
    question itself, which the fixed template maps one to one onto the prompt (the split of
    stack-exchange data is the same as before formats existed)."""
    if not isinstance(row, dict):
        return Pair("bad_json")
    fields = FORMAT_FIELDS[fmt]
    reason = _present(row, fields)
    if reason:
        return Pair(reason)
    if fmt == "stack_exchange":
        reason = _texts_reason([row[f] for f in fields], max_chars)
        q = row["question"]
        return Pair(reason) if reason else Pair(VALID, format_prompt(q, template), row["response_j"],
                                                row["response_k"], split_key=q)
    if fmt == "standard":
        reason = _texts_reason([row[f] for f in fields], max_chars)
        return Pair(reason) if reason else Pair(VALID, row["prompt"], row["chosen"], row["rejected"],
                                                split_key=row["prompt"])
    if fmt == "conversational":
        values = [row[f] for f in fields]
        reason = _messages_reason(values, max_chars)
        return Pair(reason) if reason else _rendered(renderer, *(normalize(v) for v in values))
    # implicit_prompt: whole conversations, or texts
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        reason = _messages_reason([chosen, rejected], max_chars)
        if reason:
            return Pair(reason)
        split = extract_prompt(normalize(chosen), normalize(rejected))
        return Pair("no_shared_prefix") if split is None else _rendered(renderer, *split)
    reason = _texts_reason([chosen, rejected], max_chars)
    if reason:
        return Pair(reason)
    split = extract_prompt(chosen, rejected)
    if split is None:
        return Pair("no_shared_prefix")
    p, c, r = split
    if not c.strip() or not r.strip():  # TRL's cut can leave a response of only a space
        return Pair("empty_field")
    return Pair(VALID, p, c, r, split_key=p)


_BAD = object()


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


def is_eval(key: str, eval_fraction: float) -> bool:
    """Whether a prompt (its split key, `Pair.split_key`) belongs to the eval split.

    A function of the prompt text alone (sha1, not Python's salted ``hash``): stable across
    processes, runs and machines, needs no shuffle or global view (streaming-friendly), and a
    prompt with several pairs (asked twice, or UltraFeedback-style data) always lands in the same
    split, so no prompt leaks from train into eval.
    """
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2.0**64 < eval_fraction


def encode_row(row: Any) -> str:
    """Serialise an arbitrary (possibly malformed) row as JSON text, so a string column can carry
    it past Arrow's type inference (non-JSON values such as datetimes become strings)."""
    return json.dumps(row, ensure_ascii=False, default=str)


def prepare_rows(rows: list[Any], max_chars: int, template: str, eval_fraction: float,
                 reasons: list[str] | None = None, fmt: str = "stack_exchange",
                 columns: dict[str, str] | None = None, renderer=None) -> dict[str, list]:
    """Rename, validate, format and split parsed rows of format ``fmt``: the columns every source
    ends up with.

    ``reasons`` carries problems already found while reading (e.g. ``bad_encoding``); rows with
    one are not looked at again. ``columns`` renames (`raydpo.data.formats.rename`); ``renderer``
    renders message lists (`to_pair`). Returns equal-length lists ``reason`` (``""`` = valid),
    ``prompt``, ``chosen``, ``rejected`` (empty strings for dropped rows), ``is_eval`` and
    ``templated``.
    """
    out: dict[str, list] = {"reason": [], "prompt": [], "chosen": [], "rejected": [], "is_eval": [],
                            "templated": []}
    for i, row in enumerate(rows):
        pre = reasons[i] if reasons else VALID
        pair = Pair(pre) if pre else to_pair(rename(row, columns), fmt, max_chars, template, renderer)
        ok = pair.reason == VALID
        out["reason"].append(pair.reason)
        out["prompt"].append(pair.prompt)
        out["chosen"].append(pair.chosen)
        out["rejected"].append(pair.rejected)
        out["is_eval"].append(is_eval(pair.split_key, eval_fraction) if ok else False)
        out["templated"].append(pair.templated)
    return out
