"""Row validation, formatting, the train/eval split, reading malformed JSONL, truncation and EOS
rules in tokens, and the collate functions. No Ray: these are the functions Ray Data runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo, collate_sft, pair_tokens
from raydpo.data.rows import REASONS, decode_line, drop_reason, format_prompt, is_eval, parse_json_line, prepare_rows
from raydpo.data.sources import lines_to_rows, records_to_rows
from raydpo.data.tokenize import pack_sft, tokenize_dpo, truncate_pair

GOOD = {"question": "How?", "response_j": "Like this.", "response_k": "No idea."}
OPTS = {"max_chars": 1000, "template": "Question: {question}\n\nAnswer: ", "eval_fraction": 0.5}


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("row,reason", [
    (GOOD, ""),
    ({**GOOD, "qid": 3, "metadata": ["https://x"], "extra": None}, ""),  # other keys don't matter
    ({"question": "How?", "response_j": "x"}, "missing_field"),
    ({}, "missing_field"),
    ({**GOOD, "response_k": None}, "null_field"),
    ({**GOOD, "question": 42}, "not_text"),
    ({**GOOD, "response_j": ["a"]}, "not_text"),
    ({**GOOD, "response_k": {"text": "a"}}, "not_text"),
    ({**GOOD, "response_k": True}, "not_text"),
    ({**GOOD, "question": "bad \ud800 surrogate"}, "bad_encoding"),
    ({**GOOD, "question": ""}, "empty_field"),
    ({**GOOD, "response_j": "  \n\t"}, "empty_field"),
    ({**GOOD, "response_k": " Like this. "}, "chosen_equals_rejected"),
    ({**GOOD, "question": "x" * 500}, "too_long"),
    (parse_json_line('{"question": "broken'), "bad_json"),
    (parse_json_line("[1, 2, 3]"), "bad_json"),
    (parse_json_line("null"), "bad_json"),
    ("a string row", "bad_json"),
])
def test_drop_reasons(row, reason):
    assert drop_reason(row, max_chars=100) == reason
    assert reason == "" or reason in REASONS


def test_too_long_counts_question_and_both_answers_against_max_chars():
    row = {"question": "q" * 10, "response_j": "j" * 10, "response_k": "k" * 10}
    assert drop_reason(row, max_chars=30) == ""
    assert drop_reason(row, max_chars=29) == "too_long"


def test_first_failing_check_wins_so_each_row_is_counted_once():
    row = {"question": None, "response_j": 5, "response_k": "   "}  # null, not text and empty
    assert drop_reason(row, 100) == "null_field"


def test_decode_line_handles_crlf_bom_and_invalid_utf8():
    assert decode_line(b'{"a": 1}\r') == '{"a": 1}'
    assert decode_line('\ufeff{"a": 1}'.encode()) == '{"a": 1}'
    assert decode_line("é → 中".encode()) == "é → 中"
    assert decode_line(b'{"question": "caf\xe9"}') is None  # latin-1 byte: not UTF-8


# -- formatting and split ---------------------------------------------------------------------

def test_prompt_format_is_the_stack_llama_2_one_by_default():
    assert format_prompt("Why?", Config().data.prompt_template) == "Question: Why?\n\nAnswer: "
    assert format_prompt("Why {x}?", "Q: {question} A:") == "Q: Why {x}? A:"  # braces in text are safe


def test_prepare_rows_formats_valid_rows_and_blanks_dropped_ones():
    rows = [GOOD, {**GOOD, "response_j": None}, GOOD]
    out = prepare_rows(rows, reasons=["", "", "bad_encoding"], **OPTS)
    assert out["reason"] == ["", "null_field", "bad_encoding"]
    assert out["prompt"] == ["Question: How?\n\nAnswer: ", "", ""]
    assert out["chosen"] == ["Like this.", "", ""] and out["rejected"] == ["No idea.", "", ""]
    assert out["is_eval"][1:] == [False, False]


def test_split_is_stable_roughly_the_requested_fraction_and_per_question():
    qs = [f"How do I fix error {i}?" for i in range(20000)]
    first = [is_eval(q, 0.1) for q in qs]
    assert first == [is_eval(q, 0.1) for q in qs]
    assert 0.09 < sum(first) / len(qs) < 0.11
    # a larger fraction only moves questions into eval, never out of it
    assert all(is_eval(q, 0.3) for q, e in zip(qs, first) if e)
    # the same question asked in two rows (two answer pairs) lands on the same side
    rows = [{"question": q, "response_j": "a", "response_k": "b"} for q in qs[:50] * 2]
    split = prepare_rows(rows, **OPTS)["is_eval"]
    assert split[:50] == split[50:]


def test_split_does_not_depend_on_python_hash_randomization():
    code = "from raydpo.data.rows import is_eval; print([is_eval(f'q{i}', 0.5) for i in range(64)])"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and outs.pop().strip() == str([is_eval(f"q{i}", 0.5) for i in range(64)])


# -- reading malformed rows (the functions Ray Data maps over files) --------------------------

def test_jsonl_lines_with_malformed_rows_are_counted_not_raised():
    lines = [
        json.dumps(GOOD),
        json.dumps({"question": "q", "response_j": "a"}),
        json.dumps({"question": None, "response_j": "a", "response_k": "b"}),
        json.dumps({"question": 12345, "response_j": "a", "response_k": "b"}),
        json.dumps({"question": "q", "response_j": "  ", "response_k": "b"}),
        json.dumps({"question": "q", "response_j": "same", "response_k": "same"}),
        '{"question": "broken json',
        "[1, 2]",
        b'{"question": "caf\xe9", "response_j": "a", "response_k": "b"}',
        "",  # blank lines are not rows
        "   ",
        json.dumps({**GOOD, "question": "Second?"}),
    ]
    data = b"\r\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
    blocks = list(lines_to_rows(pa.table({"bytes": [data]}), **OPTS))
    out = pa.concat_tables(blocks).to_pydict()
    assert out["reason"] == ["", "missing_field", "null_field", "not_text", "empty_field", "chosen_equals_rejected",
                             "bad_json", "bad_json", "bad_encoding", ""]
    assert out["prompt"][-1] == "Question: Second?\n\nAnswer: "


def test_lines_to_rows_yields_bounded_blocks(monkeypatch):
    import raydpo.data.sources as sources

    monkeypatch.setattr(sources, "LINES_PER_BLOCK", 4)
    data = "\n".join(json.dumps({**GOOD, "question": f"q{i}"}) for i in range(10)).encode()
    blocks = list(lines_to_rows(pa.table({"bytes": [data]}), **OPTS))
    assert [b.num_rows for b in blocks] == [4, 4, 2]


def test_typed_records_with_nulls_are_validated():
    t = pa.table({"question": ["q1", None, "q3"], "response_j": ["a", "a", "a"], "response_k": ["b", "b", "a"],
                  "qid": [1, 2, 3]})
    assert records_to_rows(t, **OPTS)["reason"].to_pylist() == ["", "null_field", "chosen_equals_rejected"]


# -- tokens: truncation and EOS ---------------------------------------------------------------

BOS, EOS = 1, 2


def test_truncation_keeps_bos_and_prompt_end_then_cuts_responses():
    prompt = [BOS] + list(range(10, 30))  # 21 tokens
    chosen, rejected = list(range(100, 110)) + [EOS], [7, 8, EOS]
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=16, max_prompt_length=8, bos_id=BOS)
    assert cut and p == [BOS] + list(range(23, 30))  # BOS + the last 7 prompt tokens
    assert c == list(range(100, 108))  # cut to 16 - 8 = 8: EOS lost, the answer did not end
    assert r == [7, 8, EOS]  # short enough: untouched, keeps EOS


def test_no_truncation_when_the_pair_fits_even_if_the_prompt_is_long():
    prompt = [BOS] + list(range(10, 22))  # 13 tokens > max_prompt_length, but 13 + 3 <= 16
    assert truncate_pair(prompt, [5, 6, EOS], [7, EOS], 16, 8, BOS) == (prompt, [5, 6, EOS], [7, EOS], False)


def test_prompt_cut_alone_can_be_enough_and_keeps_both_eos():
    prompt = [BOS] + list(range(10, 25))  # 16 tokens
    p, c, r, cut = truncate_pair(prompt, [5, 6, EOS], [7, 8, 9, EOS], 16, 8, BOS)
    assert cut and len(p) == 8 and p[0] == BOS and p[-1] == 24
    assert c == [5, 6, EOS] and r == [7, 8, 9, EOS]


def test_both_responses_are_cut_to_the_same_budget():
    p, c, r, cut = truncate_pair([BOS, 3, 4], list(range(40, 60)), list(range(60, 75)), 10, 5, BOS)
    assert cut and p == [BOS, 3, 4] and c == list(range(40, 47)) and r == list(range(60, 67))


def test_prompt_without_bos_keeps_its_last_tokens():
    p, _, _, cut = truncate_pair(list(range(10, 30)), [5, EOS], [6, EOS], 10, 4, bos_id=BOS)
    assert cut and p == [26, 27, 28, 29]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, tiny_cache):
    from raydpo.models.factory import resolve_model_path
    from raydpo.data.tokenizer import load_tokenizer

    cfg = Config().with_overrides({"model.cache_dir": tiny_cache})
    return load_tokenizer(resolve_model_path(cfg.model))


def test_tokenize_dpo_bos_on_prompt_eos_on_responses(tokenizer):
    out = tokenize_dpo(tokenizer, ["Question: Why?\n\nAnswer: "], ["Because."], ["No."], 64, 32)
    p, c, r = out["prompt_input_ids"][0], out["chosen_input_ids"][0], out["rejected_input_ids"][0]
    assert p[0] == tokenizer.bos_token_id and p.count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in c + r
    assert c[-1] == tokenizer.eos_token_id and r[-1] == tokenizer.eos_token_id
    # prompt + response is the joint text's encoding: the space before "Because" goes with it
    assert p + c[:-1] == tokenizer("Question: Why?\n\nAnswer: Because.")["input_ids"]
    assert tokenizer.decode(p[1:]) == "Question: Why?\n\nAnswer:" and tokenizer.decode(c[:-1]) == " Because."
    assert out["truncated"] == [False]


def test_tokenize_dpo_truncates_long_pairs_within_max_length(tokenizer):
    long = tokenize_dpo(tokenizer, ["Question: " + "why " * 200, "Question: ok?"], ["yes " * 100, "Sure."],
                        ["no", "Nope."], 64, 32)
    assert long["truncated"] == [True, False]
    p, c, r = long["prompt_input_ids"][0], long["chosen_input_ids"][0], long["rejected_input_ids"][0]
    assert len(p) == 32 and p[0] == tokenizer.bos_token_id
    assert len(p) + len(c) == 64 and c[-1] != tokenizer.eos_token_id  # cut: no EOS
    assert r[-1] == tokenizer.eos_token_id  # the short answer keeps its EOS


def test_pack_sft_fixed_blocks_drop_only_the_tail(tokenizer):
    texts = [f"Question: q{i}?\n\nAnswer: answer number {i}." for i in range(30)]
    stream = []
    for t in texts:
        stream += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    blocks = pack_sft(tokenizer, texts, block_size=16)
    assert len(blocks) == len(stream) // 16 and all(len(b) == 16 for b in blocks)
    assert sum(blocks, []) == stream[: len(blocks) * 16]  # BOS text EOS BOS text EOS ..., in order
    assert pack_sft(tokenizer, ["hi"], block_size=64) == []  # fewer tokens than a block: nothing


# -- collate ----------------------------------------------------------------------------------

def _obj(*rows):
    return np.array([np.array(r, dtype=np.int32) for r in rows] + [None], dtype=object)[:-1]


def _pairs():
    return {
        "prompt_input_ids": _obj([1, 5, 6], [1, 7]),
        "chosen_input_ids": _obj([8, 2], [9, 9, 9, 2]),
        "rejected_input_ids": _obj([4, 2], [3, 2]),
        "truncated": np.array([False, False]),
    }


def test_collate_dpo_plain_concatenates_chosen_then_rejected_and_scores_responses_only():
    out = collate_dpo(_pairs(), pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 8, 2, 0],  # prompt 0 + chosen 0
                                         [1, 7, 9, 9, 9, 2],  # prompt 1 + chosen 1 (longest: no pad)
                                         [1, 5, 6, 4, 2, 0],  # prompt 0 + rejected 0
                                         [1, 7, 3, 2, 0, 0]]  # prompt 1 + rejected 1
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert out["position_ids"][1].tolist() == list(range(6))
    # position t predicts token t+1: only response tokens are scored, never prompt or padding
    assert out["score_pos"].tolist() == [[2, 3, 0, 0], [1, 2, 3, 4], [2, 3, 0, 0], [1, 2, 0, 0]]
    assert out["score_tgt"].tolist() == [[8, 2, 0, 0], [9, 9, 9, 2], [4, 2, 0, 0], [3, 2, 0, 0]]
    assert out["score_slot"].tolist() == [[0, 0, -1, -1], [1] * 4, [2, 2, -1, -1], [3, 3, -1, -1]]
    assert out["pair_lengths"].tolist() == [[3, 2, 2], [2, 4, 2]]
    assert pair_tokens(out).item() == 2 * 3 + 2 + 2 + 2 * 2 + 4 + 2  # the prompt once per response


def test_collate_dpo_shared_prefix_puts_the_prompt_once_and_restarts_rejected_positions():
    out = collate_dpo(_pairs(), pad_token_id=0, share_prefix=True)
    assert "attention_mask" not in out  # the forward builds the prefix-sharing mask
    assert out["input_ids"].tolist() == [[1, 5, 6, 8, 2, 4, 2, 0], [1, 7, 9, 9, 9, 2, 3, 2]]
    assert out["segments"].tolist() == [[0, 0, 0, 1, 1, 2, 2, -1], [0, 0, 1, 1, 1, 1, 2, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 0], [0, 1, 2, 3, 4, 5, 2, 3]]
    # the first rejected token is predicted by the last prompt token, as in the plain layout
    assert out["score_pos"].tolist() == [[2, 3, 2, 5, 0, 0], [1, 2, 3, 4, 1, 6]]
    assert out["score_tgt"].tolist() == [[8, 2, 4, 2, 0, 0], [9, 9, 9, 2, 3, 2]]
    assert out["score_slot"].tolist() == [[0, 0, 2, 2, -1, -1], [1, 1, 1, 1, 3, 3]]
    assert pair_tokens(out) == pair_tokens(collate_dpo(_pairs(), pad_token_id=0))


def test_collate_dpo_padding_free_puts_every_pair_in_one_row_with_its_span():
    batch = {"prompt_input_ids": _obj([1, 5, 6, 7], [1], [1, 7]), "chosen_input_ids": _obj([8, 2], [9], [2]),
             "rejected_input_ids": _obj([4, 2], [3], [2])}
    out = collate_dpo(batch, pad_token_id=0, share_prefix=True, pack=True)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2, 4, 2, 1, 9, 3, 1, 7, 2, 2]]  # no padding at all
    assert out["seq_ids"].tolist() == [[0] * 8 + [1] * 3 + [2] * 4]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 1, 0, 1, 2, 2]]  # restart per pair
    assert out["spans"].tolist() == [[0, 4, 2, 2], [8, 1, 1, 1], [11, 2, 1, 1]]  # start, prompt, chosen, rejected
    assert out["score_pos"].tolist() == [[3, 4, 3, 6, 8, 8, 12, 12]]
    assert out["score_tgt"].tolist() == [[8, 2, 4, 2, 9, 3, 2, 2]]
    assert out["score_slot"].tolist() == [[0, 0, 3, 3, 1, 4, 2, 5]]  # slot = side * B + pair
    assert out["pair_lengths"].tolist() == [[4, 2, 2], [1, 1, 1], [2, 1, 1]]
    unshared = collate_dpo(batch, pad_token_id=0, pack=True)  # chosen sequences, then rejected ones
    assert unshared["spans"].tolist() == [[0, 4, 2, 0], [6, 1, 1, 0], [8, 2, 1, 0],
                                          [11, 4, 2, 0], [17, 1, 1, 0], [19, 2, 1, 0]]
    assert unshared["input_ids"].shape == (1, 22) and (unshared["seq_ids"] >= 0).all()
    padded = collate_dpo(batch, pad_token_id=0, share_prefix=True)
    assert (padded["seq_ids"] < 0).sum() == 9  # what padding-free saves here


def test_pair_attention_mask_keeps_rejected_from_chosen_and_sequences_apart():
    from raydpo.models.pairs import pair_attention_mask

    # one row: pair A = prompt p, chosen c, rejected r; then pair B = prompt q, chosen d; then padding
    seq = torch.tensor([[0, 0, 0, 1, 1, -1]])
    seg = torch.tensor([[0, 1, 2, 0, 1, -1]])
    m = pair_attention_mask(seq, seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],   # p
                 [1, 1, 0, 0, 0, 0],   # c sees p
                 [1, 0, 1, 0, 0, 0],   # r sees p and itself, not c
                 [0, 0, 0, 1, 0, 0],   # q: a new sequence
                 [0, 0, 0, 1, 1, 0],   # d sees q
                 [0, 0, 0, 0, 0, 1]]   # padding sees only itself (no empty softmax row)
    add = pair_attention_mask(seq, seg, additive=True)[0, 0]
    assert add.dtype == torch.float32 and ((add == 0) == torch.tensor(m, dtype=torch.bool)).all()


def test_collate_dpo_passes_reference_logps_through():
    batch = {"prompt_input_ids": [[1, 5]], "chosen_input_ids": [[8, 8, 8, 2]], "rejected_input_ids": [[4, 2]],
             "ref_chosen_logps": np.array([-1.5], dtype=np.float32),
             "ref_rejected_logps": np.array([-3.0], dtype=np.float32)}
    for share, pack in ((False, False), (True, True)):
        out = collate_dpo(batch, pad_token_id=3, share_prefix=share, pack=pack)
        assert torch.equal(out["ref_chosen_logps"], torch.tensor([-1.5]))
        assert torch.equal(out["ref_rejected_logps"], torch.tensor([-3.0]))
        assert out["ref_chosen_logps"].dtype == torch.float32
    assert collate_dpo(batch, pad_token_id=3)["input_ids"][1].tolist() == [1, 5, 4, 2, 3, 3]


def test_collate_sft_labels_are_inputs_without_padding():
    out = collate_sft({"input_ids": _obj(range(4), range(4, 8))})
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (2, 4)
    assert torch.equal(out["labels"], out["input_ids"]) and out["labels"].data_ptr() != out["input_ids"].data_ptr()
    assert out["attention_mask"].tolist() == [[1] * 4] * 2
    fixed = collate_sft({"input_ids": np.arange(8).reshape(2, 4)})  # Ray hands fixed-size lists as 2-D
    assert torch.equal(fixed["input_ids"], out["input_ids"])


