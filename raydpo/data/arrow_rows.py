"""`raydpo.data.rows.prepare_rows` on whole Arrow columns: the same reasons, texts and split for
typed sources (parquet, the hub, the sample) of the plain-text formats, without a Python object
per row.

A row check in Python costs ~25 µs a row (dicts, ``strip``, ``format``); a 7.4M-pair source
spends minutes there before its first step. Here every check is an Arrow kernel over a column:

* ``str.strip()`` is `pc.utf8_trim` with exactly the characters ``str.isspace`` accepts
  (`PY_WHITESPACE`), so "empty" and "chosen == rejected" mean what they mean in Python;
* ``len`` is `pc.utf8_length` (code points, as Python counts);
* the prompt template is joined column-wise when it is plain text around ``{question}``;
* the split's sha1 runs on the key's bytes, with no decode.

`arrow_rows` returns None where it cannot promise the Python path's answer (a message format, a
column that is missing or not text, text that is not valid UTF-8, a template with other fields
or format specs); the caller then runs `prepare_rows`. ``tests/test_arrow_rows.py`` holds the two
paths equal on every drop reason.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping

import numpy as np

from raydpo.data.formats import FIELDS as FORMAT_FIELDS

PY_WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())  # what str.strip() strips
_NOT_SPACE = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]"  # RE2: any other character
_SPLIT_KEY = {"stack_exchange": "question", "standard": "prompt"}


def template_parts(template: str) -> list[str | None] | None:
    """``template`` as literal strings and None (where the question goes), or None when it holds
    anything but ``{question}`` (another field, a format spec, a conversion)."""
    parts: list[str | None] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    for literal, field, spec, conversion in parsed:
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if field != "question" or spec or conversion:
            return None
        parts.append(None)
    return parts


def _source_column(field: str, names: list[str], columns: Mapping[str, str] | None) -> str | None:
    """The column ``field`` is read from (`raydpo.data.formats.rename`'s rule), or None."""
    if columns and field in columns and columns[field] in names:
        return columns[field]
    if field in names and not (columns and field in columns.values()):
        return field
    return None


def _text_columns(table, fields: tuple[str, ...], columns: Mapping[str, str] | None):
    """The format's columns as valid UTF-8 string arrays, or None (the Python path decides)."""
    import pyarrow as pa

    out = []
    for f in fields:
        name = _source_column(f, table.column_names, columns)
        if name is None:
            return None
        col = table[name].combine_chunks() if isinstance(table[name], pa.ChunkedArray) else table[name]
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            return None
        try:
            col.validate(full=True)  # UTF-8: what a Python decode of each value would check
        except pa.ArrowInvalid:
            return None
        out.append(col.cast(pa.string()) if pa.types.is_large_string(col.type) else col)
    return out


def _reasons(values: list, max_chars: int):
    """`raydpo.data.rows._texts_reason` of every row at once (the first failing check wins)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def flag(mask):
        return pc.fill_null(mask, True)

    answers = [pc.utf8_trim(v, characters=PY_WHITESPACE) for v in values[-2:]]  # compared stripped
    blank = [pc.invert(pc.match_substring_regex(v, _NOT_SPACE)) for v in values[:-2]] + [
        pc.equal(a, "") for a in answers]
    null = _any([pc.is_null(v) for v in values])
    empty = flag(_any(blank))
    same = flag(pc.equal(answers[0], answers[1]))
    too_long = _too_long(values, max_chars)
    reason = pa.nulls(len(values[0]), pa.string()).fill_null("")
    for mask, why in ((too_long, "too_long"), (same, "chosen_equals_rejected"), (empty, "empty_field"),
                      (null, "null_field")):
        reason = pc.if_else(mask, why, reason)
    return reason


def _too_long(values: list, max_chars: int):
    """Rows whose texts hold more than ``max_chars`` characters (code points, as Python counts):
    counted only where their bytes say they might (a code point is one to four bytes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    nbytes = sum(pc.binary_length(v.cast(pa.binary())).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                 for v in values)
    out = np.zeros(len(values[0]), bool)
    maybe = np.flatnonzero(nbytes > max_chars)
    if len(maybe):
        chars = sum(pc.utf8_length(v.take(pa.array(maybe)).fill_null("")).to_numpy(zero_copy_only=False)
                    .astype(np.int64) for v in values)
        out[maybe] = chars > max_chars
    return pa.array(out)


def _any(masks: list):
    import pyarrow.compute as pc

    out = masks[0]
    for m in masks[1:]:
        out = pc.or_kleene(out, m)
    return out


def _is_eval(keys, valid: np.ndarray, eval_fraction: float) -> np.ndarray:
    """`raydpo.data.rows.is_eval` of each valid row's split key (False for the others), hashed
    from the column's buffers."""
    import pyarrow as pa

    out = np.zeros(len(keys), bool)
    idx = np.flatnonzero(valid).tolist()
    if not idx:
        return out
    col = keys.cast(pa.binary())
    o = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + len(col) + 1].tolist()
    data = memoryview(col.buffers()[2] or b"")
    sha1 = hashlib.sha1
    digests = np.frombuffer(b"".join(sha1(data[o[i]:o[i + 1]]).digest()[:8] for i in idx), dtype=">u8")
    out[idx] = digests.astype(np.float64) / 2.0**64 < eval_fraction
    return out


def _formatted(questions, parts: list[str | None]):
    """The template (`template_parts`) filled with each question, as a string array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if parts.count(None) != 1:  # no {question}, or several: Arrow's join (slower, rarely needed)
        pieces = [questions.fill_null("") if p is None else pa.scalar(p) for p in parts]
        if None not in parts:
            return pa.array(["".join(parts)] * len(questions), pa.string())
        return pc.binary_join_element_wise(*pieces, "")
    at = parts.index(None)
    return _wrap(questions, "".join(parts[:at]).encode(), "".join(parts[at + 1:]).encode())


def _wrap(col, prefix: bytes, suffix: bytes):
    """``prefix + value + suffix`` for every value of a string array (null: ""), joined from
    slices of its buffer: twice as fast as ``binary_join_element_wise`` on long texts."""
    import pyarrow as pa

    col = col.fill_null("") if col.null_count else col
    n = len(col)
    o = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + n + 1].astype(np.int64)
    data, b = memoryview(col.buffers()[2] or b""), o.tolist()
    out = b"".join(piece for i in range(n) for piece in (prefix, data[b[i]:b[i + 1]], suffix))
    starts = np.concatenate([[0], np.cumsum(np.diff(o) + len(prefix) + len(suffix))]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(starts), pa.py_buffer(out))


def arrow_rows(table, fmt: str, max_chars: int, template: str, eval_fraction: float,
               columns: Mapping[str, str] | None = None):
    """`raydpo.data.rows.prepare_rows`'s columns for the rows of ``table`` (a pyarrow Table), as
    a pyarrow Table; None when only the Python path can give the same answer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = template_parts(template) if fmt == "stack_exchange" else None
    if fmt not in _SPLIT_KEY or (fmt == "stack_exchange" and parts is None):
        return None
    values = _text_columns(table, FORMAT_FIELDS[fmt], columns)
    if values is None:
        return None
    reason = _reasons(values, max_chars)
    valid = pc.equal(reason, "")
    prompt, chosen, rejected = values
    if fmt == "stack_exchange":
        prompt = _formatted(prompt, parts)
    keys = values[0]
    is_eval = _is_eval(keys, valid.to_numpy(zero_copy_only=False), eval_fraction)
    return pa.table({
        "reason": reason,
        "prompt": pc.if_else(valid, prompt, ""),
        "chosen": pc.if_else(valid, chosen, ""),
        "rejected": pc.if_else(valid, rejected, ""),
        "is_eval": pa.array(is_eval, pa.bool_()),
        "templated": pa.array(np.zeros(len(keys), bool), pa.bool_()),
    })
