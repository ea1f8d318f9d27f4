"""Row validation, formatting, split, truncation/EOS in tokens, collate, the generated sample."""

import re

import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo, collate_sft
from raydpo.data.rows import drop_reason, format_prompt, is_eval, parse_json_line
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import pack_sft, tokenize_dpo, truncate_pair

GOOD = {"question": "How?", "response_j": "Like this.", "response_k": "No idea."}


@pytest.mark.parametrize("row,reason", [
    (GOOD, ""),
    ({"question": "How?", "response_j": "x"}, "missing_field"),
    ({**GOOD, "response_k": None}, "null_field"),
    ({**GOOD, "question": 42}, "not_text"),
    ({**GOOD, "response_j": ["a"]}, "not_text"),
    ({**GOOD, "question": ""}, "empty_field"),
    ({**GOOD, "response_j": "  \n\t"}, "empty_field"),
    ({**GOOD, "response_k": " Like this. "}, "chosen_equals_rejected"),
    ({**GOOD, "question": "x" * 500}, "too_long"),
    (parse_json_line('{"question": "broken'), "bad_json"),
    ([1, 2, 3], "bad_json"),
])
def test_drop_reasons(row, reason):
    assert drop_reason(row, max_chars=100) == reason


def test_prompt_format_is_the_stack_llama_2_one():
    assert format_prompt("Why?", Config().data.prompt_template) == "Question: Why?\n\nAnswer: "


def test_split_is_stable_and_roughly_the_requested_fraction():
    qs = [f"question {i}" for i in range(4000)]
    first = [is_eval(q, 0.1) for q in qs]
    assert first == [is_eval(q, 0.1) for q in qs]
    assert 0.07 < sum(first) / len(qs) < 0.13


BOS, EOS = 1, 2


def test_truncation_keeps_bos_and_prompt_end_then_cuts_responses():
    prompt = [BOS] + list(range(10, 30))  # 21 tokens
    chosen, rejected = list(range(100, 110)) + [EOS], [7, 8, EOS]
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=16, max_prompt_length=8, bos_id=BOS)
    assert cut and p == [BOS] + list(range(23, 30))  # BOS + the last 7 prompt tokens
    assert c == list(range(100, 108))  # cut to 16 - 8: EOS lost, the answer did not end
    assert r == [7, 8, EOS]  # short enough: untouched, keeps EOS
    same = truncate_pair([BOS, 5], [6, EOS], [7, EOS], 16, 8, BOS)
    assert same == ([BOS, 5], [6, EOS], [7, EOS], False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from raydpo.models import load_tokenizer, resolve_model_path

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return load_tokenizer(resolve_model_path(cfg.model))


def test_tokenize_dpo_bos_on_prompt_eos_on_responses(tokenizer):
    out = tokenize_dpo(tokenizer, ["Question: Why?\n\nAnswer: "], ["Because."], ["No."], 64, 32)
    p, c, r = out["prompt_input_ids"][0], out["chosen_input_ids"][0], out["rejected_input_ids"][0]
    assert p[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in c
    assert c[-1] == tokenizer.eos_token_id and r[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(c[:-1]) == "Because." and out["truncated"] == [False]
    long = tokenize_dpo(tokenizer, ["Question: " + "why " * 200], ["yes " * 100], ["no"], 64, 32)
    assert long["truncated"] == [True]
    assert len(long["prompt_input_ids"][0]) == 32
    assert len(long["prompt_input_ids"][0]) + len(long["chosen_input_ids"][0]) == 64


def test_pack_sft_fixed_blocks_with_eos_between_examples(tokenizer):
    blocks = pack_sft(tokenizer, ["one two three"] * 20, block_size=16)
    assert blocks and all(len(b) == 16 for b in blocks)
    flat = sum(blocks, [])
    assert flat.count(tokenizer.eos_token_id) >= len(flat) // 16 - 1


def test_collate_dpo_masks_prompt_and_padding():
    batch = {
        "prompt_input_ids": np.array([np.array([1, 5, 6]), np.array([1, 7])], dtype=object),
        "chosen_input_ids": np.array([np.array([8, 2]), np.array([9, 9, 9, 2])], dtype=object),
        "rejected_input_ids": np.array([np.array([4, 2]), np.array([3, 2])], dtype=object),
        "ref_chosen_logps": np.array([-1.0, -2.0]), "ref_rejected_logps": np.array([-3.0, -4.0]),
    }
    out = collate_dpo(batch, pad_token_id=0)
    assert out["input_ids"].shape == (4, 6)
    assert out["input_ids"][0].tolist() == [1, 5, 6, 8, 2, 0]  # chosen rows first
    assert out["input_ids"][2].tolist() == [1, 5, 6, 4, 2, 0]  # then rejected, same prompts
    assert out["labels"][0].tolist() == [-100, -100, -100, 8, 2, -100]
    assert out["labels"][1].tolist() == [-100, -100, 9, 9, 9, 2]
    assert out["attention_mask"][3].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(out["ref_rejected_logps"], torch.tensor([-3.0, -4.0]))


def test_collate_sft_labels_are_inputs():
    out = collate_sft({"input_ids": np.array([np.arange(4), np.arange(4, 8)], dtype=object)})
    assert out["input_ids"].shape == (2, 4) and torch.equal(out["labels"], out["input_ids"])


def test_sample_is_deterministic_in_schema_and_any_size():
    a, b = generate_rows(50, seed=3), generate_rows(50, seed=3)
    assert a == b and a != generate_rows(50, seed=4)
    assert len(generate_rows(1234)) == 1234
    for r in a:
        assert set(r) == {"qid", "question", "response_j", "response_k", "date", "metadata"}
        assert drop_reason(r, 10_000) == ""


def _words(s):
    return set(re.findall(r"[a-z]+", s.lower()))


def test_sample_chosen_is_measurably_more_relevant_than_rejected():
    rows = generate_rows(1000, seed=0)
    overlap_c = np.mean([len(_words(r["question"]) & _words(r["response_j"])) for r in rows])
    overlap_r = np.mean([len(_words(r["question"]) & _words(r["response_k"])) for r in rows])
    assert overlap_c > 1.5 * overlap_r
    # and chosen answers are longer, well-formed sentences
    assert np.mean([r["response_j"].rstrip().endswith((".", "!", "`")) for r in rows]) > 0.9


def test_tiny_model_and_tokenizer_load_offline(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.tiny import ensure_tiny_model

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path)})
    path = ensure_tiny_model(cfg.model)
    assert ensure_tiny_model(cfg.model) == path  # built once, then reused
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("Question: How do I rename a git branch?", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    assert model(**ids).logits.shape[-1] == len(tok)
    # byte-level: real stack-exchange text (code, unicode) round-trips
    text = "```\nprint('héllo → wörld')\n```"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
