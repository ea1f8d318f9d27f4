"""The generated sample (deterministic, stack-exchange-paired schema, a measurable preference
signal) and the tiny local model (offline, deterministic, race-safe)."""

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raydpo.config import Config
from raydpo.data.rows import drop_reason
from raydpo.data.sample import LOW_EFFORT, RAMBLE, TOPICS, generate_rows, sample_texts


def _words(s: str) -> set[str]:
    return set(re.findall(r"[a-z]+", s.lower()))


def _topic(question: str) -> str:
    """The one topic whose question template the question was filled from."""
    hits = set()
    for t, spec in TOPICS.items():
        for q, _, _ in spec["items"]:
            pattern = re.escape(q)
            for slot in ("x", "y", "n"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), r"[\w.]+")
            if re.search(pattern, question):
                hits.add(t)
    assert len(hits) == 1, (question, hits)
    return hits.pop()


# -- sample -----------------------------------------------------------------------------------

def test_sample_is_deterministic_per_seed_and_any_size():
    a, b = generate_rows(200, seed=3), generate_rows(200, seed=3)
    assert a == b
    other = generate_rows(200, seed=4)
    assert sum(x["question"] == y["question"] for x, y in zip(a, other)) < 20  # a different dataset
    assert generate_rows(50, seed=3) == a[:50]  # growing n only appends rows
    assert len(generate_rows(1234)) == 1234 and generate_rows(0) == []
    with pytest.raises(ValueError):
        generate_rows(-1)


def test_sample_has_the_stack_exchange_paired_schema_and_only_valid_rows():
    rows = generate_rows(500, seed=1)
    for r in rows:
        assert set(r) == {"qid", "question", "response_j", "response_k", "date", "metadata"}
        assert isinstance(r["qid"], int) and re.fullmatch(r"20\d\d/\d\d/\d\d", r["date"])
        assert "/questions/" in r["metadata"][0] and all(u.startswith("https://") for u in r["metadata"])
        assert drop_reason(r, 10_000) == ""
    assert len({r["qid"] for r in rows}) == len(rows)


def test_sample_covers_many_topics_with_short_varied_texts():
    assert 15 <= len(TOPICS) <= 25
    rows = generate_rows(2000, seed=0)
    assert len({r["question"] for r in rows}) > 0.95 * len(rows)  # names and numbers vary
    q = [len(r["question"].split()) for r in rows]
    c = [len(r["response_j"].split()) for r in rows]
    assert 20 <= np.median(q) <= 60 and max(q) <= 80
    assert 15 <= np.median(c) <= 60 and max(c) <= 80
    # every topic shows up, and some chosen answers carry a fenced code block
    seen = Counter(_topic(r["question"]) for r in rows)
    assert set(seen) == set(TOPICS) and min(seen.values()) > 0.5 * len(rows) / len(TOPICS)
    assert 0.1 < np.mean(["```" in r["response_j"] for r in rows]) < 0.6


def test_sample_preference_signal_is_measurable():
    rows = generate_rows(2000, seed=0)
    # chosen answers talk about the question: they share its words and reuse its names
    overlap_c = np.mean([len(_words(r["question"]) & _words(r["response_j"])) for r in rows])
    overlap_r = np.mean([len(_words(r["question"]) & _words(r["response_k"])) for r in rows])
    assert overlap_c > 1.5 * overlap_r
    # chosen answers are well formed: they end a sentence or a code block
    assert np.mean([r["response_j"].rstrip().endswith((".", "```")) for r in rows]) > 0.95
    # every kind of worse answer is there
    low = np.mean([r["response_k"] in LOW_EFFORT for r in rows])
    ramble = np.mean([any(s in r["response_k"] for s in RAMBLE) for r in rows])
    garbled = np.mean([sorted(r["response_k"].split()) == sorted(r["response_j"].split("```")[0].split())
                       for r in rows])
    off_topic = 1 - low - ramble - garbled
    assert all(0.05 < share < 0.45 for share in (low, ramble, garbled, off_topic)), (low, ramble, garbled, off_topic)


def test_sample_texts_are_deterministic_strings():
    a = list(sample_texts(100, seed=0))
    assert a == list(sample_texts(100, seed=0)) and a != list(sample_texts(100, seed=1))
    assert len(a) >= 300 and all(isinstance(t, str) and t for t in a)


# -- tiny model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from raydpo.models.tiny import ensure_tiny_model

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return cfg, ensure_tiny_model(cfg.model)


def test_tiny_model_and_tokenizer_load_offline_with_auto_classes(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, path = tiny
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == cfg.model.tiny.hidden_size
    assert model.config.num_hidden_layers == cfg.model.tiny.num_hidden_layers
    assert len(tok) == model.config.vocab_size == cfg.model.tiny.vocab_size
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id}) == 4
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    enc = tok("Question: How do I rename a git branch?\n\nAnswer: ", return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids
    assert tok(["a b", "c"], add_special_tokens=False)["input_ids"][0][0] != tok.bos_token_id
    logits = model(**enc).logits
    assert logits.shape == (1, len(ids), len(tok)) and logits.isfinite().all()


def test_tiny_tokenizer_is_byte_level_any_text_round_trips(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[1])
    for text in ["```python\nprint('héllo → wörld')\n```", "naïve café 中文 😀 \t tabs", "x\u00a0y \\d{4} <b>&amp;</b>"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    # trained on the sample: its words are whole tokens, far fewer tokens than bytes
    answer = generate_rows(1)[0]["response_j"]
    assert len(tok(answer)["input_ids"]) < 0.5 * len(answer.encode())


def test_tiny_is_built_once_keyed_by_its_config_and_deterministic(tiny, tmp_path):
    from raydpo.models.tiny import ensure_tiny_model

    cfg, path = tiny
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(cfg.model) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert path.parent == Path(cfg.model.cache_dir).resolve() and not list(path.parent.glob(".tiny-build-*"))
    # a fresh cache elsewhere rebuilds the very same files (seeded weights, deterministic BPE)
    again = ensure_tiny_model(Config().with_overrides({"model.cache_dir": str(tmp_path)}).model)
    assert again.name == path.name
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / f).read_bytes() == (path / f).read_bytes(), f
    # a different shape is a different folder
    other = Config().with_overrides({"model.cache_dir": str(tmp_path), "model.tiny.hidden_size": 32}).model
    assert ensure_tiny_model(other).name != path.name


def test_tiny_build_that_loses_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    """Another process renames its finished folder into place while we are still building."""
    import raydpo.models.tiny as tiny

    real_build = tiny.build_tiny
    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path)}).model
    final = tmp_path / f"tiny-llama-{tiny._key(cfg)}"

    def build_while_another_process_finishes(model_cfg, out):
        real_build(model_cfg, out)
        winner = tmp_path / ".other-process"
        real_build(model_cfg, winner)
        (winner / "WINNER").write_text("")
        os.replace(winner, final)

    monkeypatch.setattr(tiny, "build_tiny", build_while_another_process_finishes)
    assert tiny.ensure_tiny_model(cfg) == final
    assert (final / "WINNER").exists()  # the winner's folder, untouched
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our half is cleaned up

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(final).bos_token == "<s>"
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size == 2048
