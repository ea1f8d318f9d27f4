"""Precomputed reference log-probs give the same DPO losses as the on-the-fly reference."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.models.factory import load_model, resolve_model_path
from raydpo.data.tokenizer import load_tokenizer
from raydpo.orchestration.reference import RefLogps
from raydpo.train.loop import dpo_forward


@pytest.mark.parametrize("quant,loss_type", [("none", "sigmoid"), ("4bit", "sigmoid"), ("4bit", "ipo")])
def test_precomputed_reference_matches_on_the_fly(tiny_cache, quant, loss_type):
    cfg = Config().with_overrides({"model.cache_dir": tiny_cache, "quantization.mode": quant,
                                   "quantization.compute_dtype": "float32", "dpo.loss_type": loss_type})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(12, seed=5)
    ids = tokenize_dpo(tok, [format_prompt(r["question"], cfg.data.prompt_template) for r in rows],
                       [r["response_j"] for r in rows], [r["response_k"] for r in rows], 128, 64)
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in ids.items() if k.endswith("_input_ids")})
    with_ref = RefLogps(cfg.to_dict(), path)(table)  # one big inference batch of 12

    torch.manual_seed(0)
    policy = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    with torch.no_grad():  # a trained-looking adapter, so policy != reference
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    policy.eval()
    for lo in range(0, 12, 4):  # training batches of 4: different padding than the inference batch
        cols = {k: np.array(with_ref[k].to_pylist()[lo:lo + 4] + [None], dtype=object)[:-1]
                for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        fly = collate_dpo(cols, tok.pad_token_id)
        pre = dict(fly, ref_chosen_logps=torch.tensor(with_ref["ref_chosen_logps"].to_pylist()[lo:lo + 4]),
                   ref_rejected_logps=torch.tensor(with_ref["ref_rejected_logps"].to_pylist()[lo:lo + 4]))
        with torch.no_grad():
            loss_fly, m_fly = dpo_forward(policy, policy, fly, cfg)
            loss_pre, m_pre = dpo_forward(policy, policy, pre, cfg)
        assert abs(loss_fly.item() - loss_pre.item()) < 1e-4
        for k in m_fly:
            assert abs(m_fly[k].item() - m_pre[k].item()) < 1e-4 * max(1.0, abs(m_fly[k].item())), k
        assert abs(m_fly["rewards/chosen"].item()) > 1e-4  # the comparison is not trivially 0 == 0


# -- the cache is keyed by content -------------------------------------------------------------


def test_files_digest_follows_content_not_path_and_is_remembered(tmp_path):
    from raydpo.orchestration.reference import files_digest

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"A" * 100)
    (d / "adapter_config.json").write_text("{}")
    memo = tmp_path / "memo"
    first = files_digest(d, memo)
    assert files_digest(d, memo) == first and (memo / "digests.json").exists()
    (d / "adapter_model.safetensors").write_bytes(b"B" * 100)  # a new adapter at the same path
    assert files_digest(d, memo) != first
    (d / "adapter_model.safetensors").write_bytes(b"A" * 100)
    assert files_digest(d, memo) == first


def test_cache_key_changes_with_the_reference_the_tokenizer_and_the_data(tmp_path):
    import shutil

    from raydpo.orchestration.reference import cache_key
    from raydpo.storage import MERGED_MARKER

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path / "cache"), "run.storage_path": str(tmp_path / "runs")})
    path = resolve_model_path(cfg.model)
    model = tmp_path / "model"
    shutil.copytree(path, model)
    key, parts = cache_key(cfg, str(model))
    assert cache_key(cfg, str(model))[0] == key  # stable
    assert cache_key(cfg.with_overrides({"dpo.beta": 0.5, "dpo.lr": 1e-3}), str(model))[0] == key  # not numbers it ignores
    w = next(model.glob("*.safetensors"))
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 1
    w.write_bytes(bytes(blob))  # other weights, same path
    assert cache_key(cfg, str(model))[1]["reference"] != parts["reference"]
    w.write_bytes(bytes(blob[:-1] + bytes([blob[-1] ^ 1])))
    assert cache_key(cfg, str(model))[0] == key
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + " ")
    assert cache_key(cfg, str(model))[1]["tokenizer"] != parts["tokenizer"]
    assert cache_key(cfg.with_overrides({"data.max_length": 2048}), str(model))[1]["data"] != parts["data"]
    assert cache_key(cfg.with_overrides({"quantization.mode": "4bit"}), str(model))[0] != key
    src = tmp_path / "rows.jsonl"
    src.write_text('{"question": "q", "response_j": "a", "response_k": "b"}\n')
    from_file = cfg.with_overrides({"data.source": str(src)})
    k1 = cache_key(from_file, str(model))[0]
    src.write_text('{"question": "q", "response_j": "a", "response_k": "c"}\n')
    assert cache_key(from_file, str(model))[0] != k1  # same file name, new rows
    # a merged SFT model is identified by its base and the SFT adapter's content
    (model / MERGED_MARKER).write_text('{"adapter_digest": "a1", "base_identity": "b"}')
    m1 = cache_key(cfg, str(model))[0]
    (model / MERGED_MARKER).write_text('{"adapter_digest": "a2", "base_identity": "b"}')
    assert cache_key(cfg, str(model))[0] != m1


def test_a_cache_folder_is_trusted_only_with_a_marker_matching_its_files(tmp_path):
    import json

    import pyarrow.parquet as pq

    from raydpo.orchestration.reference import valid_cache
    from raydpo.storage import REFERENCE_MARKER as MARKER

    root = tmp_path / "key"
    for split, n in (("train", 3), ("eval", 0)):
        (root / split).mkdir(parents=True)
        if n:
            pq.write_table(pa.table({"x": list(range(n))}), root / split / "part-0.parquet")
    assert valid_cache(root) is None  # no marker: a half-written cache
    (root / MARKER).write_text(json.dumps({"rows": {"train": 3, "eval": 0}}))
    assert valid_cache(root)["rows"] == {"train": 3, "eval": 0}  # an empty eval split is a valid cache
    (root / MARKER).write_text(json.dumps({"rows": {"train": 4, "eval": 0}}))
    assert valid_cache(root) is None  # a lost file
    (root / MARKER).write_text("{not json")
    assert valid_cache(root) is None


def test_a_finished_merge_of_the_same_sft_content_is_linked_never_a_different_or_partial_one(tmp_path):
    """A second run from one SFT adapter in the same storage links the first run's merge (same
    adapter digest and base identity) instead of merging again; its marker stays its own; a
    merge of other content, or a folder without weights, is never used."""
    import json

    from raydpo.orchestration.base import _link_same_merge
    from raydpo.storage import MERGED_MARKER

    want = {"adapter_digest": "a1", "base_identity": "b1"}

    def merge(run: str, digests: dict, weights: bool = True) -> None:
        d = tmp_path / run / "sft-merged"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        if weights:
            (d / "model.safetensors").write_bytes(run.encode())
        (d / MERGED_MARKER).write_text(json.dumps({"adapter": run, **digests}))

    merge("a-other", {"adapter_digest": "a2", "base_identity": "b1"})  # another SFT adapter
    merge("b-partial", want, weights=False)  # no weights: never trusted
    out = tmp_path / "new" / "sft-merged"
    assert not _link_same_merge(tmp_path, want, out) and not out.exists()

    merge("c-same", want)
    assert _link_same_merge(tmp_path, want, out)
    assert (out / "model.safetensors").samefile(tmp_path / "c-same" / "sft-merged" / "model.safetensors")
    assert not (out / MERGED_MARKER).exists()  # the caller writes its own; the source's is untouched
