"""Data formats: stack-exchange, TRL's standard / conversational / implicit-prompt rows and
renamed columns, from one row to the text the model reads; detection per source; message-row
drop reasons; chat-template rendering against the tokenizer's own ``apply_chat_template``; the
split by prompt; the tiny tokenizer's chat template and the conversational sample. No Ray."""

import json
import pickle

import pyarrow as pa
import pytest

from raydpo.config import CANONICAL_COLUMNS, DATA_FORMATS, Config, ConfigError, check_resources, load_config
from raydpo.data.chat import ChatRenderer
from raydpo.data.formats import FIELDS, FormatError, detect, extract_prompt, rename
from raydpo.data.rows import REASONS, is_eval, prepare_rows, to_pair
from raydpo.data.sample import generate_rows, sample_rows
from raydpo.data.sources import (DataSourceError, chat_renderer, json_texts_to_rows, lines_to_rows, records_to_rows,
                                 resolve_format)
from raydpo.data.tokenize import pack_sft, tokenize_dpo

TEMPLATE = "Question: {question}\n\nAnswer: "
OPTS = {"max_chars": 1000, "template": TEMPLATE, "eval_fraction": 0.5}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONV = {"prompt": [user("Why?")], "chosen": [assistant("Because.")], "rejected": [assistant("No.")]}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_cache):
    from raydpo.models.factory import resolve_model_path

    cfg = Config().with_overrides({"model.cache_dir": tiny_cache})
    return resolve_model_path(cfg.model)


@pytest.fixture(scope="module")
def tok(tiny_path):
    from raydpo.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def renderer(tok):
    return ChatRenderer.from_tokenizer(tok)


def test_format_names_agree_with_the_config():
    assert tuple(FIELDS) == DATA_FORMATS
    assert sorted({c for cols in FIELDS.values() for c in cols}) == sorted(CANONICAL_COLUMNS)


# -- one row of each format → prompt / chosen / rejected --------------------------------------

def test_stack_exchange_rows_are_formatted_as_before():
    p = to_pair({"question": "Why?", "response_j": "Because.", "response_k": "No."}, "stack_exchange", 1000, TEMPLATE)
    assert p == ("", "Question: Why?\n\nAnswer: ", "Because.", "No.", "Why?", False)


def test_standard_rows_use_the_prompt_as_is_no_template():
    p = to_pair({"prompt": "Translate: chat", "chosen": " cat", "rejected": " dog"}, "standard", 1000, TEMPLATE)
    assert (p.reason, p.prompt, p.chosen, p.rejected, p.templated) == ("", "Translate: chat", " cat", " dog", False)
    assert p.split_key == "Translate: chat"


def test_conversational_rows_render_as_the_tokenizers_apply_chat_template(tok, renderer):
    """TRL's rule: the prompt with the generation prompt; each response is what prompt + response
    rendered as one conversation adds after it."""
    rows = [CONV,
            {"prompt": [{"role": "system", "content": "Be brief."}, user("Why?")],
             "chosen": [assistant("Because.")], "rejected": [assistant("No.")]},
            {"prompt": [user("a"), assistant("b"), user("c")], "chosen": [assistant("d")], "rejected": [assistant("e")]}]
    for row in rows:
        p = to_pair(row, "conversational", 1000, TEMPLATE, renderer)
        assert p.reason == "" and p.templated and p.split_key == p.prompt
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert p.prompt == prompt
        assert p.prompt + p.chosen == tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        assert p.prompt + p.rejected == tok.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False)
    p = to_pair(CONV, "conversational", 1000, TEMPLATE, renderer)
    assert (p.prompt, p.chosen, p.rejected) == ("<s>Question: Why?\n\nAnswer: ", "Because.</s>", "No.</s>")


def test_a_prompt_ending_with_the_assistant_is_continued_not_given_a_new_turn(tok, renderer):
    row = {"prompt": [user("Hi"), assistant("Sure,")], "chosen": [assistant(" more")], "rejected": [assistant(" less")]}
    p = to_pair(row, "conversational", 1000, TEMPLATE, renderer)
    assert p.prompt == tok.apply_chat_template(row["prompt"], tokenize=False, continue_final_message=True)
    assert p.prompt.endswith("Answer: Sure,")


def test_renderer_is_small_picklable_and_renders_like_the_tokenizer(tok, renderer):
    again = pickle.loads(pickle.dumps(renderer))
    assert again == renderer and len(pickle.dumps(renderer)) < 5000  # the template and special tokens only
    msgs = [{"role": "system", "content": "S"}, user("Q"), assistant("A"), user("Q2")]
    for kw in ({}, {"add_generation_prompt": True}):
        assert again.render(msgs, **kw) == tok.apply_chat_template(msgs, tokenize=False, **kw)
    # null-valued keys are dropped first, as apply_chat_template does (Arrow fills them in)
    assert again.render([{**user("Q"), "name": None}]) == again.render([user("Q")])


def test_data_chat_template_overrides_the_tokenizers(tok):
    chatml = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    r = ChatRenderer.from_tokenizer(tok, chatml)
    p = to_pair(CONV, "conversational", 1000, TEMPLATE, r)
    assert (p.prompt, p.chosen, p.rejected) == ("<|user|>Why?</s><|assistant|>", "Because.</s>", "No.</s>")
    assert r.render(CONV["prompt"]) == tok.apply_chat_template(CONV["prompt"], tokenize=False, chat_template=chatml)
    with pytest.raises(ValueError, match="not valid jinja"):
        ChatRenderer.from_tokenizer(tok, "{% for m in messages %}")


def test_implicit_prompt_conversations_share_their_first_turns(renderer):
    row = {"chosen": [user("Why?"), assistant("Because.")], "rejected": [user("Why?"), assistant("No.")]}
    p = to_pair(row, "implicit_prompt", 1000, TEMPLATE, renderer)
    assert p == to_pair(CONV, "conversational", 1000, TEMPLATE, renderer)  # the same pair, the same text


def test_implicit_prompt_strings_share_a_prefix_trl_style():
    row = {"chosen": "Q: sky colour? A: blue", "rejected": "Q: sky colour? A: green"}
    p = to_pair(row, "implicit_prompt", 1000, TEMPLATE)
    assert (p.reason, p.prompt, p.chosen, p.rejected, p.templated) == (
        "", "Q: sky colour? A:", " blue", " green", False)  # the space stays with the responses


def test_extract_prompt_matches_trl_extract_prompt():
    # strings: the prompt ends where they first differ, one character earlier before a space
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("ab", "ac") == ("a", "b", "c")
    # one a prefix of the other: TRL's loop ends one element short of the shorter one
    assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")
    # messages: the longest common run of whole turns
    a = [user("q"), assistant("x"), user("q2"), assistant("y")]
    b = [user("q"), assistant("x"), user("q2"), assistant("z")]
    assert extract_prompt(a, b) == (a[:3], a[3:], b[3:])
    assert extract_prompt([user("q"), assistant("x")], [user("q"), assistant("x"), user("r"), assistant("s")]) == (
        [user("q")], [assistant("x")], [assistant("x"), user("r"), assistant("s")])
    # nothing shared (or only a space) is no prompt at all
    for c, r in (("abc", "xbc"), (" a", " b"), ([user("q")], [user("r")]), ([], [user("q")]), ("a", "a")):
        assert extract_prompt(c, r) is None, (c, r)


def test_renamed_columns_are_read_as_their_canonical_names(renderer):
    cols = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}
    row = {"instruction": "Say hi", "good": "Hi!", "bad": "No.", "prompt": "ignored: mapped from instruction"}
    assert rename(row, cols) == {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
    assert rename({"a": 1}, None) == {"a": 1} and rename("not a row", cols) == "not a row"
    out = prepare_rows([row], **OPTS, fmt="standard", columns=cols)
    assert (out["reason"], out["prompt"], out["chosen"]) == ([""], ["Say hi"], ["Hi!"])
    # swapping two columns works too
    assert rename({"chosen": "a", "rejected": "b"}, {"chosen": "rejected", "rejected": "chosen"}) == {
        "chosen": "b", "rejected": "a"}


# -- detection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,fmt", [
    ([{"question": "q", "response_j": "a", "response_k": "b", "qid": 1}], "stack_exchange"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "standard"),
    ([CONV], "conversational"),
    ([{"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}], "implicit_prompt"),
    ([{"chosen": "q a", "rejected": "q b"}], "implicit_prompt"),
    # a plain-text prompt column beside whole conversations is not the prompt (TRL's maybe_extract_prompt)
    ([{"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}],
     "implicit_prompt"),
    # the first rows that look like a format decide; malformed ones before them are skipped
    (["not a row", {"prompt": None, "chosen": "a", "rejected": "b"}, {"question": "q"}, CONV], "conversational"),
    ([], None),
    (["garbage", 42, None], None),  # nothing to go by: the caller's default (stack-exchange)
])
def test_detect_takes_the_first_row_that_looks_like_a_format(rows, fmt):
    assert detect(rows) == fmt


def test_detect_after_renaming_and_one_error_naming_the_columns_found():
    rows = [{"instruction": "Say hi", "output_good": "Hi!", "output_bad": "No."}]
    with pytest.raises(FormatError) as e:
        detect(rows)
    msg = str(e.value)
    assert "instruction, output_bad, output_good" in msg and "stack_exchange" in msg and "implicit_prompt" in msg
    assert "\n" not in msg
    assert detect(rows, {"prompt": "instruction", "chosen": "output_good", "rejected": "output_bad"}) == "standard"
    with pytest.raises(FormatError):  # bounded: only the first `limit` rows are looked at
        detect(rows * 3 + [CONV], limit=3)
    assert detect(rows * 3 + [CONV], limit=4) == "conversational"


def test_resolve_format_per_source_and_the_chat_template_error(tmp_path, tiny_path):
    cfg = Config().data
    assert resolve_format(cfg, iter([{"question": "q", "response_j": "a", "response_k": "b"}]), "src") == (
        "stack_exchange", None)
    fmt, r = resolve_format(cfg, iter([CONV]), "src", tiny_path)
    assert fmt == "conversational" and isinstance(r, ChatRenderer)
    with pytest.raises(DataSourceError) as e:
        resolve_format(cfg, iter([{"input": "x", "output": "y"}]), "/data/x.jsonl")
    assert str(e.value).startswith("/data/x.jsonl: no known data format") and "input, output" in str(e.value)
    # a forced format is not detected: rows that do not fit are dropped one by one instead
    forced = cfg.model_copy(update={"format": "standard"})
    assert resolve_format(forced, iter([{"input": "x"}]), "src") == ("standard", None)
    # message rows and no chat template anywhere: one line, before any training
    from raydpo.data.tokenizer import load_tokenizer

    bare = tmp_path / "bare"
    t = load_tokenizer(tiny_path)
    t.chat_template = None
    t.save_pretrained(bare)
    with pytest.raises(DataSourceError) as e:
        resolve_format(cfg, iter([CONV]), "src", str(bare))
    assert str(e.value) == (f"data.format conversational needs a chat template: the tokenizer {bare} has none; "
                            "set data.chat_template")
    with_template = cfg.model_copy(update={"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    assert resolve_format(with_template, iter([CONV]), "src", str(bare))[1].template == with_template.chat_template
    # implicit prompts need a template only when they are conversations
    assert resolve_format(cfg, iter([{"chosen": "q a", "rejected": "q b"}]), "src", str(bare)) == (
        "implicit_prompt", None)
    with pytest.raises(DataSourceError, match="implicit_prompt needs a chat template"):
        resolve_format(cfg, iter([{"chosen": [user("q"), assistant("a")], "rejected": [user("q")]}]), "s", str(bare))
    with pytest.raises(DataSourceError, match="data.chat_template: the chat template is not valid jinja"):
        chat_renderer(cfg.model_copy(update={"chat_template": "{% if %}"}), "conversational", str(bare))


# -- drop reasons for message rows -------------------------------------------------------------

BAD_MESSAGES = [  # (row, reason)
    ({"prompt": "Why?", "chosen": [assistant("a")], "rejected": [assistant("b")]}, "not_messages"),
    ({"prompt": [user("Why?")], "chosen": ["a"], "rejected": [assistant("b")]}, "not_messages"),
    ({"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "empty_field"),
    ({"prompt": [{"content": "Why?"}], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "bad_role"),
    ({"prompt": [{"role": "human", "content": "Why?"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "bad_role"),
    ({"prompt": [{"role": "system", "content": "S"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "bad_role"),  # a prompt may not end on a system turn (TRL raises)
    ({"prompt": [user(42)], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "not_text"),
    ({"prompt": [user("bad \ud800")], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "bad_encoding"),
    ({"prompt": [user("  ")], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "empty_content"),
    ({"prompt": [user("Why?")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]}, "empty_content"),
    ({"prompt": [user("Why?")], "chosen": [assistant(None)], "rejected": [assistant("b")]}, "empty_content"),
    ({"prompt": [user("Why?")], "chosen": [assistant("a ")], "rejected": [assistant(" a")]}, "chosen_equals_rejected"),
    ({"prompt": [user("x" * 2000)], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "too_long"),
    ({"prompt": [{"role": "tool", "content": "42"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "template_error"),  # the tiny template knows no tool turns: it raises, the row is counted
    ({"prompt": [user("Why?")], "chosen": None, "rejected": [assistant("b")]}, "null_field"),
    ({"prompt": [user("Why?")], "rejected": [assistant("b")]}, "missing_field"),
]


@pytest.mark.parametrize("row,reason", BAD_MESSAGES)
def test_message_row_drop_reasons(row, reason, renderer):
    assert reason in REASONS
    assert to_pair(row, "conversational", 1000, TEMPLATE, renderer).reason == reason


def test_implicit_prompt_drop_reasons(renderer):
    def reason(row):
        return to_pair(row, "implicit_prompt", 1000, TEMPLATE, renderer).reason

    assert reason({"chosen": "abc", "rejected": "xyz"}) == "no_shared_prefix"
    assert reason({"chosen": [user("q"), assistant("a")], "rejected": [user("r"), assistant("b")]}) == "no_shared_prefix"
    assert reason({"chosen": [user("q"), assistant("a")], "rejected": "q b"}) == "not_messages"
    assert reason({"chosen": "same", "rejected": "same "}) == "chosen_equals_rejected"
    assert reason({"chosen": "q a ", "rejected": "q a  x"}) == "empty_field"  # TRL's cut leaves " " as chosen
    assert reason({"chosen": [{"role": "gpt", "content": "a"}], "rejected": [user("q")]}) == "bad_role"
    assert reason({"chosen": 3, "rejected": "b"}) == "not_text"
    assert reason({"rejected": "b"}) == "missing_field"
    # a conversation whose shared part ends on a system turn has no prompt TRL can render
    sys = {"role": "system", "content": "S"}
    assert reason({"chosen": [sys, user("a")], "rejected": [sys, user("b")]}) == "bad_role"
    # message rows without any chat template: counted, not raised
    assert to_pair({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
                   "implicit_prompt", 1000, TEMPLATE).reason == "template_error"


def test_mixed_good_and_bad_jsonl_rows_of_every_new_reason_are_counted_and_the_good_kept(renderer):
    good = [CONV, {**CONV, "prompt": [user("How?")]}]
    lines = [json.dumps(good[0])] + [json.dumps(r) for r, _ in BAD_MESSAGES if "\ud800" not in str(r)]
    lines += ['{"broken', json.dumps(good[1])]
    data = "\n".join(lines).encode()
    out = pa.concat_tables(lines_to_rows(pa.table({"bytes": [data]}), **OPTS, fmt="conversational",
                                         renderer=renderer)).to_pydict()
    want = [""] + [r for row, r in BAD_MESSAGES if "\ud800" not in str(row)] + ["bad_json", ""]
    assert out["reason"] == want
    kept = [i for i, r in enumerate(out["reason"]) if r == ""]
    assert [out["prompt"][i] for i in kept] == ["<s>Question: Why?\n\nAnswer: ", "<s>Question: How?\n\nAnswer: "]
    assert all(out["templated"][i] for i in kept) and not any(out["templated"][i] for i in range(1, len(want) - 1))
    assert {"not_messages", "bad_role", "empty_content", "template_error"} <= set(want)


def test_typed_message_columns_from_parquet_or_the_hub(renderer):
    # Arrow gives every message every key of the column, null where absent
    t = pa.Table.from_pylist([{**CONV, "prompt": [{"role": "user", "content": "Why?", "name": "ann"}]}, CONV,
                              {**CONV, "chosen": [{"role": "assistant", "content": None}]}])
    out = records_to_rows(t, **OPTS, fmt="conversational", renderer=renderer).to_pydict()
    assert out["reason"] == ["", "", "empty_content"] and out["prompt"][0] == out["prompt"][1]


def test_implicit_prompts_with_no_shared_prefix_in_json_array_rows():
    rows = [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, {"chosen": "abc", "rejected": "xyz"}]
    out = json_texts_to_rows(pa.table({"raw": [json.dumps(r) for r in rows]}), **OPTS, fmt="implicit_prompt").to_pydict()
    assert out["reason"] == ["", "no_shared_prefix"] and out["prompt"][0] == "Q: hi A:"


# -- the split ---------------------------------------------------------------------------------

def test_split_hashes_the_rendered_prompt_so_a_prompt_with_many_pairs_stays_on_one_side(renderer):
    """UltraFeedback-style data: one prompt, several pairs."""
    prompts = [f"How do I fix error {i}?" for i in range(40)]
    rows = [{"prompt": [user(p)], "chosen": [assistant(f"fix {k}")], "rejected": [assistant(f"no {k}")]}
            for k in range(3) for p in prompts]
    out = prepare_rows(rows, **OPTS, fmt="conversational", renderer=renderer)
    assert out["reason"] == [""] * len(rows)
    sides = {}
    for prompt, side in zip(out["prompt"], out["is_eval"]):
        sides.setdefault(prompt, set()).add(side)
    assert len(sides) == 40 and all(len(s) == 1 for s in sides.values())
    assert out["is_eval"] == [is_eval(p, 0.5) for p in out["prompt"]]  # the rendered prompt is the key
    assert 5 < sum(out["is_eval"][:40]) < 35
    # standard rows likewise; stack-exchange rows keep their question as the key (one to one with
    # the prompt under the fixed template): their split is the one from before formats existed
    std = prepare_rows([{"prompt": p, "chosen": "a", "rejected": "b"} for p in prompts], **OPTS, fmt="standard")
    assert std["is_eval"] == [is_eval(p, 0.5) for p in prompts]
    se = prepare_rows(generate_rows(50), **OPTS)
    assert se["is_eval"] == [is_eval(r["question"], 0.5) for r in generate_rows(50)]


# -- tokens of templated rows ------------------------------------------------------------------

def test_templated_text_gets_no_second_bos_or_eos(tok, renderer):
    p = to_pair(CONV, "conversational", 1000, TEMPLATE, renderer)
    out = tokenize_dpo(tok, [p.prompt], [p.chosen], [p.rejected], 64, 32, [True])
    ids_p, ids_c = out["prompt_input_ids"][0], out["chosen_input_ids"][0]
    assert ids_p[0] == tok.bos_token_id and ids_p.count(tok.bos_token_id) == 1
    assert ids_c[-1] == tok.eos_token_id and ids_c.count(tok.eos_token_id) == 1
    # prompt + response: the whole conversation's ids as apply_chat_template gives them, split
    # (`raydpo.data.tokenize`: encoded together, as for every format)
    full = tok.apply_chat_template(CONV["prompt"] + CONV["chosen"], tokenize=True, return_dict=False)
    assert ids_p + ids_c == full
    # SFT: the whole conversation as apply_chat_template tokenizes it, nothing added
    assert tok(p.prompt + p.chosen, add_special_tokens=False)["input_ids"] == full
    stream = sum(pack_sft(tok, [p.prompt + p.chosen] * 8, 16, [True] * 8), [])
    assert stream == (full * 8)[:len(stream)] and len(stream) == (len(full) * 8 // 16) * 16


def test_the_conversational_sample_trains_on_the_very_tokens_of_the_default_one(tok, renderer):
    """The tiny template frames a turn as the default prompt template does: same pairs, same ids."""
    n = 40
    se = prepare_rows(sample_rows(n, 3), **{**OPTS, "max_chars": 200_000})
    conv = prepare_rows(sample_rows(n, 3, "conversational"), **{**OPTS, "max_chars": 200_000}, fmt="conversational",
                        renderer=renderer)
    assert se["reason"] == conv["reason"] == [""] * n
    a = tokenize_dpo(tok, se["prompt"], se["chosen"], se["rejected"], 512, 256, se["templated"])
    b = tokenize_dpo(tok, conv["prompt"], conv["chosen"], conv["rejected"], 512, 256, conv["templated"])
    for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a[k] == b[k], k
    texts = [p + c for p, c in zip(se["prompt"], se["chosen"])]
    ctexts = [p + c for p, c in zip(conv["prompt"], conv["chosen"])]
    assert pack_sft(tok, texts, 64) == pack_sft(tok, ctexts, 64, conv["templated"])


# -- the tiny tokenizer and the sample ---------------------------------------------------------

def test_tiny_tokenizer_ships_a_chat_template(tiny_path, tok):
    from pathlib import Path

    from transformers import AutoTokenizer

    assert tok.chat_template and (Path(tiny_path) / "chat_template.jinja").exists()
    fresh = AutoTokenizer.from_pretrained(tiny_path)
    msgs = [{"role": "system", "content": "Be brief."}, user("Why?")]
    assert fresh.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<s>Be brief.\n\nQuestion: Why?\n\nAnswer: ")
    assert fresh.apply_chat_template(msgs + [assistant("Because.")], tokenize=False) == (
        "<s>Be brief.\n\nQuestion: Why?\n\nAnswer: Because.</s>")


def test_sample_rows_in_every_format_are_valid_and_the_same_pairs(renderer):
    base = generate_rows(30, seed=2)
    assert sample_rows(30, 2) == base  # the default format is the stack-exchange sample itself
    for fmt in DATA_FORMATS:
        rows = sample_rows(30, 2, fmt)
        assert detect(rows) == fmt
        out = prepare_rows(rows, **{**OPTS, "max_chars": 200_000}, fmt=fmt, renderer=renderer)
        assert out["reason"] == [""] * 30, fmt
    conv = sample_rows(30, 2, "conversational")
    for r, b in zip(conv, base):
        assert set(r) == {"qid", "prompt", "chosen", "rejected"}
        for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
            assert isinstance(r[key], list) and len(r[key]) == 1
            assert set(r[key][0]) == {"role", "content"} and r[key][0]["role"] == role
        assert (r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) == (
            b["question"], b["response_j"], b["response_k"])
    with pytest.raises(ValueError):
        sample_rows(1, 0, "csv")


# -- config --------------------------------------------------------------------------------------

def test_config_fields_of_formats_and_their_errors(tmp_path):
    c = load_config(None, ["data.format=conversational", "data.columns.prompt=instruction",
                           "data.chat_template='{{ messages }}'", "data.sft_source=lvwerra/stack-exchange-paired"])
    assert (c.data.format, c.data.columns, c.data.chat_template) == ("conversational", {"prompt": "instruction"},
                                                                     "{{ messages }}")
    assert Config().data.format == "auto" and Config().data.columns == {}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.format=csv", "data.columns={promt: instruction}", "data.chat_template=' '"])
    paths = dict(e.value.errors)
    assert {"data.format", "data.columns", "data.chat_template"} <= set(paths)
    assert "promt" in paths["data.columns"] and "prompt" in paths["data.columns"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.columns={chosen: answer, rejected: answer}"])
    assert "same dataset column" in dict(e.value.errors)["data.columns"]
    # sft_source is checked like source
    errs = dict(check_resources(load_config(None, [f"data.sft_source={tmp_path}/nope.jsonl"])))
    assert "no such file" in errs["data.sft_source"]
    (tmp_path / "sft.jsonl").write_text("{}\n")
    rel = load_config(None, ["data.sft_source=sft.jsonl"]).with_absolute_paths(cwd=str(tmp_path))
    assert rel.data.sft_source == str(tmp_path / "sft.jsonl")


def test_batch_functions_tokenize_like_the_pure_functions_with_one_tokenizer_per_process(tmp_path, tiny_path, tok):
    """Ray Data runs ``dpo_batch`` / ``examples_batch`` as tasks: they give the pure functions' ids,
    handed the tokenizer's name or its portable backend (no transformers in the task), the
    tokenizer is loaded once per process, and a tokenizer rewritten in place is loaded again."""
    import shutil

    from raydpo.data.packing import examples_batch
    from raydpo.data.tokenize import cached_tokenizer, dpo_batch
    from raydpo.data.tokenizer import BackendSpec, task_tokenizer

    rows = sample_rows(8, seed=3)
    pairs = [to_pair(r, "stack_exchange", 1000, TEMPLATE) for r in rows]
    batch = pa.table({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                      "rejected": [p.rejected for p in pairs]})
    spec = task_tokenizer(tiny_path)
    assert isinstance(spec, BackendSpec)  # the tiny tokenizer's backend encodes alone
    want = tokenize_dpo(tok, batch["prompt"].to_pylist(), batch["chosen"].to_pylist(), batch["rejected"].to_pylist(),
                        64, 32)
    for handed in (tiny_path, spec):
        got = dpo_batch(batch, tokenizer=handed, max_length=64, max_prompt_length=32)
        for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "truncated", "row_id"):
            assert got[k].to_pylist() == want[k]
        examples = examples_batch(batch, tokenizer=handed)["example_ids"].to_pylist()
        assert sum(examples, []) == sum(pack_sft(tok, [p + c for p, c in zip(
            batch["prompt"].to_pylist(), batch["chosen"].to_pylist())], 1), [])  # blocks of 1: every token

    copy = tmp_path / "tok"
    shutil.copytree(tiny_path, copy)
    first = cached_tokenizer(str(copy))
    assert cached_tokenizer(str(copy)) is first  # loaded once for every later batch
    cfg_file = copy / "tokenizer_config.json"
    cfg_file.write_text(cfg_file.read_text())  # rewritten in place (new mtime)
    assert cached_tokenizer(str(copy)) is not first
