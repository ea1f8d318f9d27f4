"""`raydpo.data.arrow_rows`: row checks on whole Arrow columns give `prepare_rows`'s answer row
for row — every drop reason, Python's idea of whitespace, non-ASCII text, templates, renamed
columns — and step aside (None) where they could not."""

import pyarrow as pa
import pytest

from raydpo.data.arrow_rows import arrow_rows, template_parts
from raydpo.data.rows import prepare_rows

TEMPLATE = "Question: {question}\n\nAnswer: "
SE = {"question": ["Why?", None, "  ", "Same", "Long " * 40, "Ünïcödé ✓ 你好", "\u3000x\u2028", "tab\tq",
                   "q", "{curly}"],
      "response_j": ["Because.", "a", "a", " same\n", "b", "答え", "y\x1c", "", "ok", "a"],
      "response_k": ["No.", "b", "b", "same", "c", "ответ", "z", "k", "\x85\xa0", "b"]}


def _python(table: pa.Table, fmt: str, template: str = TEMPLATE, columns=None, max_chars: int = 100) -> dict:
    return prepare_rows(table.to_pylist(), max_chars, template, 0.5, fmt=fmt, columns=columns)


def _fast(table: pa.Table, fmt: str, template: str = TEMPLATE, columns=None, max_chars: int = 100) -> dict:
    out = arrow_rows(table, fmt, max_chars, template, 0.5, columns)
    assert out is not None
    return out.to_pydict()


def test_every_reason_text_and_split_equal_the_python_path():
    table = pa.table(SE)
    python = _python(table, "stack_exchange")
    # the cases this table exists for are all there: the test would pass vacuously without them
    assert set(python["reason"]) == {"", "null_field", "empty_field", "chosen_equals_rejected", "too_long"}
    assert True in python["is_eval"] and python["reason"].count("") >= 4
    assert _fast(table, "stack_exchange") == python
    for t in (table.slice(3), table.slice(2, 5)):  # slices: buffers with an offset
        assert _fast(t, "stack_exchange") == _python(t, "stack_exchange")


@pytest.mark.parametrize("template", ["{question}", "Q: {question}", "{question} -> A:", "Q{{x}} {question}!",
                                      "no question", "{question}{question}"])
def test_templates_of_plain_text_around_the_question_format_like_str_format(template):
    table = pa.table(SE)
    assert _fast(table, "stack_exchange", template) == _python(table, "stack_exchange", template)


def test_standard_rows_and_renamed_columns_equal_the_python_path():
    std = pa.table({"p": SE["question"], "chosen": SE["response_j"], "rejected": SE["response_k"], "x": [1] * 10})
    cols = {"prompt": "p"}
    assert _fast(std, "standard", columns=cols) == _python(std, "standard", columns=cols)
    assert _fast(std, "standard", columns=cols, max_chars=12) == _python(std, "standard", columns=cols, max_chars=12)


def test_steps_aside_where_only_python_gives_the_same_answer():
    se = pa.table(SE)
    assert arrow_rows(se, "conversational", 100, TEMPLATE, 0.5) is None  # message lists
    assert arrow_rows(se.drop(["response_k"]), "stack_exchange", 100, TEMPLATE, 0.5) is None  # missing column
    ints = se.set_column(1, "response_j", pa.array(range(10)))
    assert arrow_rows(ints, "stack_exchange", 100, TEMPLATE, 0.5) is None  # not text
    assert arrow_rows(se, "stack_exchange", 100, "{question!r}", 0.5) is None  # a conversion
    assert arrow_rows(se, "stack_exchange", 100, "{question:>9}", 0.5) is None  # a format spec
    assert arrow_rows(se, "stack_exchange", 100, "{title} {question}", 0.5) is None  # another field
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\3\0\0\0"), pa.py_buffer(b"\xed\xa0\x80")])
    assert arrow_rows(pa.table({"question": bad, "response_j": ["a"], "response_k": ["b"]}),
                      "stack_exchange", 100, TEMPLATE, 0.5) is None  # not UTF-8: Python decides


def test_template_parts():
    assert template_parts(TEMPLATE) == ["Question: ", None, "\n\nAnswer: "]
    assert "".join(template_parts("{{literal}}")) == "{literal}"
    assert template_parts("{") is None


@pytest.mark.parametrize("max_chars", [5, 12, 19, 20, 21, 27, 35])
def test_too_long_counts_characters_not_bytes(max_chars):
    # 7 + 2 + 5 = 14 bytes-heavy characters (29 bytes) around the limits above
    table = pa.table({"question": ["Ünïcödé", "plain q"], "response_j": ["答え", "ab"], "response_k": ["ответ", "cd"]})
    assert _fast(table, "stack_exchange", max_chars=max_chars) == _python(table, "stack_exchange", max_chars=max_chars)
