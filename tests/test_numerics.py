"""The DPO reference is the policy at step 0 in every precision: the reference model is cast as the
training engine casts the policy (`raydpo.models.factory.cast_like_engine`), so at step 1 the
rewards are 0 and the loss is ln 2, under DeepSpeed bf16 as under fp32, 4-bit or not, with the
precomputed reference (`raydpo.orchestration.reference.RefLogps`) and the per-step one. In-process:
one gloo rank, the real loop and DeepSpeed engine, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.order import rank_batches
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.data.tokenizer import load_tokenizer
from raydpo.models.factory import cast_like_engine, load_model, resolve_model_path
from raydpo.orchestration.reference import RefLogps, cache_key
from raydpo.train.deepspeed import engine_cast_dtype
from raydpo.train.engine import WorkerEnv, build_engine
from raydpo.train.loop import Hooks, run_stage

CPU = WorkerEnv(0, 1, torch.device("cpu"), False)


def _cfg(cache, quant: str, precision: str, reference: str = "precomputed") -> Config:
    return Config().with_overrides({
        "model.cache_dir": str(cache), "quantization.mode": quant, "deepspeed.precision": precision,
        # the CPU demo's compute dtype in fp32, the GPU recipe's in bf16 (4-bit storage must match DeepSpeed's cast)
        "quantization.compute_dtype": "bfloat16" if precision == "bf16" else "float32",
        "dpo.reference": reference, "dpo.max_steps": 1, "dpo.per_device_batch_size": 4,
        "dpo.gradient_accumulation_steps": 1, "dpo.log_every": 1, "dpo.eval_every": 100, "dpo.save_every": 100,
        "scaling.num_workers": 1, "lora.dropout": 0.1,
    })


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(model folder, tokenizer, 8 tokenized pairs as the Ray Data rows hold them)."""
    cache = tmp_path_factory.mktemp("cache")
    path = resolve_model_path(Config().with_overrides({"model.cache_dir": str(cache)}).model)
    tok = load_tokenizer(path)
    rows = generate_rows(8, seed=5)
    prompt = Config().data.prompt_template
    ids = tokenize_dpo(tok, [format_prompt(r["question"][:300], prompt) for r in rows],
                       [r["response_j"][:300] for r in rows], [r["response_k"][:300] for r in rows], 128, 64)
    return cache, path, tok, ids


def test_the_engine_cast_is_deepspeeds_own_and_leaves_it_nothing_to_do(pairs, gloo):
    """`cast_like_engine` gives every parameter and buffer the dtype and bits DeepSpeed bf16 gives
    it (the fp32-upcast norms, embeddings and LM head, the LoRA weights; bf16-stored 4-bit weights
    and the rotary buffer untouched), and DeepSpeed changes nothing in a model cast so."""
    cache, path, _, _ = pairs
    cfg = _cfg(cache, "4bit", "bf16")
    assert engine_cast_dtype(cfg, use_gpu=False) == "bfloat16"
    assert engine_cast_dtype(cfg.with_overrides({"deepspeed.precision": "fp32"}), use_gpu=False) is None
    assert engine_cast_dtype(cfg.with_overrides({"deepspeed.enabled": False}), use_gpu=False) is None

    def load():
        torch.manual_seed(0)
        return load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)

    by_deepspeed, ours = load(), cast_like_engine(load(), "bfloat16")
    assert {p.dtype for p in by_deepspeed.parameters()} == {torch.float32, torch.bfloat16}  # the upcast to undo
    before = {n: t.clone() for n, t in [*ours.named_parameters(), *ours.named_buffers()]}
    build_engine(by_deepspeed, cfg, cfg.dpo, CPU)
    build_engine(ours, cfg, cfg.dpo, CPU)
    for n, t in [*by_deepspeed.named_parameters(), *by_deepspeed.named_buffers()]:
        assert t.dtype == before[n].dtype and torch.equal(_bits(t), _bits(before[n])), n
    assert dict(ours.named_buffers())["base_model.model.model.rotary_emb.inv_freq"].dtype == torch.float32
    for n, t in [*ours.named_parameters(), *ours.named_buffers()]:  # DeepSpeed's cast was a no-op
        assert torch.equal(_bits(t), _bits(before[n])), n


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: packed 4-bit weights read as bf16 hold NaN patterns, never equal as numbers."""
    return t.detach().contiguous().view(torch.uint8)


def _step1(pairs, cfg: Config) -> dict[str, float]:
    """The metrics of one DPO step through the loop and DeepSpeed, with the reference log-probs
    precomputed by the Ray Data callable (an inference batch of 8 rows, training batches of 4:
    different padding) or scored each step."""
    _, path, tok, ids = pairs
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items()}
    if cfg.dpo.precomputed_reference:
        table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in ids.items()
                          if k.endswith("_input_ids")})
        scored = RefLogps(cfg.to_dict(), path)(table)
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            cols[k] = np.array(scored[k].to_pylist(), dtype=np.float32)
    torch.manual_seed(cfg.dpo.seed)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path,
                       engine_dtype=engine_cast_dtype(cfg, use_gpu=False))

    def batches(size):
        for lo in range(0, len(cols["row_id"]) - size + 1, size):
            yield {k: v[lo:lo + size] for k, v in cols.items()}

    def collate(b):  # the configured layout (padding-free by default), as the Ray worker collates
        return collate_dpo(b, tok.pad_token_id, share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)

    logged = []
    hooks = Hooks(train_batches=lambda skip: rank_batches(batches, 4, 1, 0, collate, skip),
                  eval_batches=lambda: iter(()), report=lambda m, c: None, log=lambda m, s: logged.append(m),
                  progress=lambda s: None, stop_requested=lambda: False, config_fingerprint={})
    run_stage("dpo", cfg, model, tok, CPU, hooks)
    return logged[0]


@pytest.mark.parametrize("quant,precision,reference", [
    ("none", "bf16", "precomputed"), ("none", "fp32", "precomputed"), ("4bit", "bf16", "precomputed"),
    ("4bit", "fp32", "precomputed"), ("none", "bf16", "adapter_disabled"), ("4bit", "bf16", "adapter_disabled"),
])
def test_step_one_of_dpo_has_zero_rewards_and_loss_ln2_in_every_precision(pairs, gloo, quant, precision, reference):
    """The Must-show of issue 25: before the cast, bf16 step 1 gave margins ~1e-4 (fp32: 0). In the
    default padding-free layout a pair's numbers do not depend on its batch, so they are exact."""
    m = _step1(pairs, _cfg(pairs[0], quant, precision, reference))
    assert abs(m["train/rewards/margins"]) <= 1e-6 and abs(m["train/rewards/chosen"]) <= 1e-6, m
    assert abs(m["train/rewards/rejected"]) <= 1e-6, m
    assert abs(m["train/loss"] - math.log(2)) <= 1e-4, m


def test_the_reference_cache_is_keyed_on_the_engines_cast_and_the_libraries(tmp_path, monkeypatch):
    from importlib import metadata

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path / "cache"), "run.storage_path": str(tmp_path / "runs")})
    path = resolve_model_path(cfg.model)
    key, parts = cache_key(cfg, path)
    assert cache_key(cfg.with_overrides({"deepspeed.precision": "bf16"}), path)[1]["numerics"] != parts["numerics"]
    assert cache_key(cfg.with_overrides({"dpo.padding_free": False}), path)[1]["numerics"] != parts["numerics"]
    # DeepSpeed fp32 and the plain engine cast nothing: the same numbers, the same cache
    assert cache_key(cfg.with_overrides({"deepspeed.enabled": False}), path)[0] == key
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0" if name == "bitsandbytes" else real(name))
    assert cache_key(cfg, path)[1]["numerics"] != parts["numerics"]
