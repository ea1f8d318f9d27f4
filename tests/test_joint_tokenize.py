"""DPO's pairs are the tokens SFT trained on: prompt + response encoded together and split, checked
with a Llama-2-style (SentencePiece/Metaspace, byte fallback) tokenizer trained here on the sample,
where encoding the prompt alone ends in a lone ``▁`` that the joint text never produces."""

from __future__ import annotations

import copy

import pytest

from raydpo.data.sample import sample_rows, sample_texts
from raydpo.data.tokenize import batch_ids, common_prefix_length, pack_sft, tokenize_dpo
from raydpo.models.tiny import build_llama2_tokenizer

N = 120


@pytest.fixture(scope="module")
def tok():
    return build_llama2_tokenizer(2000, sample_texts(3000))


@pytest.fixture(scope="module")
def rows():
    """The generated pairs under the recipe's template, ``"Question: ...\\n\\nAnswer: "``."""
    rs = sample_rows(N, seed=0, fmt="standard")
    return [r["prompt"] for r in rs], [r["chosen"] for r in rs], [r["rejected"] for r in rs]


def joint(tok, prompt: str, response: str, special: bool = True) -> list[int]:
    return tok(prompt + response, add_special_tokens=special)["input_ids"]


def test_the_tokenizer_is_llama2_shaped(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 13, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"]
    assert tok.pad_token_id is None  # Llama 2 ships none (`load_tokenizer` falls back to EOS)
    ids = tok("héllo\n日本")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert "<0x0A>" in tok.convert_ids_to_tokens(ids)  # newlines and unseen characters: byte fallback
    assert tok.decode(ids, skip_special_tokens=True) == "héllo\n日本"


def test_separate_encoding_puts_a_lone_metaspace_before_the_answer(tok, rows):
    """The bug this fixes: "...Answer: " alone ends in ``▁``, the response alone starts ``▁Word``,
    a context that the joint text (SFT's, generation's) never has."""
    prompts, chosen, _ = rows
    for p, c in zip(prompts, chosen):
        alone = tok(p)["input_ids"]
        assert tok.convert_ids_to_tokens(alone[-1]) == "▁"
        assert tok.convert_ids_to_tokens(tok(c, add_special_tokens=False)["input_ids"][0]).startswith("▁")
        assert alone + tok(c, add_special_tokens=False)["input_ids"] != joint(tok, p, c)


def test_each_pair_is_the_joint_encoding_of_prompt_and_response(tok, rows):
    prompts, chosen, rejected = rows
    out = tokenize_dpo(tok, prompts, chosen, rejected, 4096, 2048)
    assert out["truncated"] == [False] * N
    eos = [tok.eos_token_id]
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        ip, ic, ir = out["prompt_input_ids"][i], out["chosen_input_ids"][i], out["rejected_input_ids"][i]
        assert ip + ic == joint(tok, p, c) + eos
        assert ip + ir == joint(tok, p, r) + eos
        # one prompt for both: the prompt's text less its lone trailing "▁"; responses carry no BOS
        assert tok.decode(ip, skip_special_tokens=True) + " " == p
        assert ip[0] == tok.bos_token_id and tok.bos_token_id not in ic + ir


def test_truncated_pairs_are_the_truncation_of_the_joint_encoding(tok, rows):
    prompts, chosen, rejected = rows
    full = tokenize_dpo(tok, prompts, chosen, rejected, 4096, 2048)
    cut = tokenize_dpo(tok, prompts, chosen, rejected, 96, 40)
    assert 0 < sum(cut["truncated"]) < N  # both kinds are checked
    for i in range(N):
        fp, fc, fr = full["prompt_input_ids"][i], full["chosen_input_ids"][i], full["rejected_input_ids"][i]
        p, c, r = cut["prompt_input_ids"][i], cut["chosen_input_ids"][i], cut["rejected_input_ids"][i]
        if not cut["truncated"][i]:
            assert (p, c, r) == (fp, fc, fr)
            continue
        # BOS + the prompt's last tokens, then each response's first tokens: windows of the joint encoding
        assert len(p) <= 40 and len(p) + max(len(c), len(r)) <= 96
        assert p[0] == tok.bos_token_id and p[1:] == fp[len(fp) - len(p) + 1:]
        assert c == fc[:len(c)] and r == fr[:len(r)]


def test_sft_packs_the_very_tokens_dpo_scores(tok, rows):
    prompts, chosen, rejected = rows
    out = tokenize_dpo(tok, prompts, chosen, rejected, 4096, 2048)
    dpo_stream = [t for ip, ic in zip(out["prompt_input_ids"], out["chosen_input_ids"]) for t in ip + ic]
    sft_stream = sum(pack_sft(tok, [p + c for p, c in zip(prompts, chosen)], 64), [])
    assert len(sft_stream) == len(dpo_stream) // 64 * 64 and sft_stream == dpo_stream[:len(sft_stream)]


def test_a_token_merging_across_the_boundary_goes_to_the_response(tok):
    """A prompt ending mid-word: the joint text has one token across the boundary. It belongs to
    the response; the prompt stops before it, for chosen and rejected alike (TRL's rule), so the
    rejected response, which does not merge, starts with the prompt's cut-off tokens."""
    word = "▁traceroute"
    assert word in tok.get_vocab()
    prompt, chosen, rejected = "Question: How do I read tracer", "oute output?", " Not sure."
    alone = tok(prompt)["input_ids"]
    assert tok.get_vocab()[word] in joint(tok, prompt, chosen) and tok.get_vocab()[word] not in alone

    out = tokenize_dpo(tok, [prompt], [chosen], [rejected], 512, 256)
    p, c, r = out["prompt_input_ids"][0], out["chosen_input_ids"][0], out["rejected_input_ids"][0]
    assert p + c == joint(tok, prompt, chosen) + [tok.eos_token_id]
    assert p + r == joint(tok, prompt, rejected) + [tok.eos_token_id]
    assert len(p) < len(alone) and p == alone[:len(p)]  # the prompt is cut before the merged word
    assert tok.convert_ids_to_tokens(c[0]) == word
    assert r[:len(alone) - len(p)] == alone[len(p):]  # rejected re-reads the prompt's tail "▁tr", "acer"...


def test_templated_rows_get_no_special_tokens_added(tok):
    prompt, chosen, rejected = "<s>Question: Why?\n\nAnswer: ", "Because.</s>", "No.</s>"
    out = tokenize_dpo(tok, [prompt], [chosen], [rejected], 512, 256, [True])
    p, c, r = out["prompt_input_ids"][0], out["chosen_input_ids"][0], out["rejected_input_ids"][0]
    assert p + c == joint(tok, prompt, chosen, special=False)
    assert p + r == joint(tok, prompt, rejected, special=False)
    assert p.count(tok.bos_token_id) == 1 and c.count(tok.eos_token_id) == 1


def test_common_prefix_length_by_hand():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5, 1], [6, 1]) == 0
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length(list(range(100)) + [7], list(range(100)) + [8]) == 100


def test_batch_ids_are_the_tokenizers_own_ids(tok, rows):
    """The offsets-free backend call gives what ``tokenizer(...)`` gives; a backend with
    truncation set goes through ``tokenizer(...)`` itself (which ignores that setting)."""
    texts = rows[0][:20] + ["<s>Question: x</s>", "", "日本"]
    for special in (True, False):
        want = tok(texts, add_special_tokens=special)["input_ids"]
        assert batch_ids(tok, texts, special) == want
        truncating = copy.deepcopy(tok)
        truncating.backend_tokenizer.enable_truncation(max_length=4)
        assert batch_ids(truncating, texts, special) == want


def test_a_task_handed_the_backend_alone_encodes_exactly_as_the_tokenizer(tok, rows):
    """Tokenization tasks get the tokenizer's Rust backend (`raydpo.data.tokenizer.portable`, no
    transformers import in the task): with the Llama-2-style tokenizer, DPO pairs and SFT examples
    are the same ids, BOS/EOS and the joint split included."""
    from raydpo.data.tokenize import sft_examples
    from raydpo.data.tokenizer import BackendTokenizer, portable

    tok = copy.deepcopy(tok)  # truncation is turned on below
    spec = portable(tok)
    assert spec is not None
    light = BackendTokenizer(spec)
    prompts, chosen, rejected = rows
    assert tokenize_dpo(light, prompts, chosen, rejected, 256, 128) == tokenize_dpo(tok, prompts, chosen, rejected,
                                                                                   256, 128)
    texts = [p + c for p, c in zip(prompts, chosen)]
    assert sft_examples(light, texts) == sft_examples(tok, texts)
    tok.backend_tokenizer.enable_truncation(8)
    assert portable(tok) is None  # a backend that would cut: tasks load the tokenizer itself
