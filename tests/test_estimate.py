"""`raydpo.orchestration.estimate` against numbers worked out by hand for a small shape, the three facts the
issue asks of the 7B recipe, where the shape comes from, and the CLI's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raydpo.cli import main
from raydpo.config import Config, load_config
from raydpo.orchestration.estimate import (BUILTIN_SHAPES, GIB, EstimateError, Shape, estimate, find_gpu, memory_parts, model_shape,
                             format_estimate, step_flops, tokens)

ROOT = Path(__file__).resolve().parents[1]
GPU_JOB = str(ROOT / "jobs" / "stack_llama_2_gpu.yaml")

# the tiny default shape: hidden 64, 2 layers, 4 heads, intermediate 176, vocab 2048; the [S', V]
# logits head, worked out by hand below (the fused head's: test_fused_head_by_hand)
SMALL = {"data.max_length": 16, "data.max_prompt_length": 8, "dpo.per_device_batch_size": 2,
         "lora.dropout": 0.0, "scaling.num_workers": 2, "deepspeed.stage": 2, "dpo.fused_lm_head": False}


def small(**over) -> Config:
    return Config().with_overrides({**SMALL, **over})


def test_small_shape_by_hand():
    cfg = small()
    shape, src = model_shape(cfg)
    assert src == "tiny (model.tiny)" and shape == Shape(64, 2, 4, 4, 176, 2048)
    # linears per layer: 4 x 64·64 + 3 x 64·176 = 16384 + 33792 = 50176, x 2 layers
    assert shape.linear_params == 100352
    assert shape.other_params == 2048 * 64 * 2 + 5 * 64  # embeddings + lm_head + 2 norms/layer + final norm
    T, S, Sl = tokens(cfg)
    assert (T, S, Sl) == (2 * (2 * 16 - 1), 2 * 2 * 15, 60)  # B·(2L-p), B·2(L-p), p = 1
    p = memory_parts(cfg, shape)
    assert p["base_weights"] == 4 * (100352 + 262464)  # fp32, no quantization
    assert p["lora_params"] == 4 * 4096  # r 8 x (64 + 64) x q,v x 2 layers = 4096 params
    assert p["lora_grads"] == 4 * 4096 / 2  # ZeRO-2 over 2 workers
    assert p["optimizer_states"] == 4096 * (8 + 4) / 2  # m, v + fp32 master, partitioned
    # saved per token per layer 4·(4·64 + 3·64 + 3·176) = 3904, + the adapters' shared input 4·64
    # (dropout 0) = 4160; x T=62 x 2 layers; + the final norm's fp32 input 4·64·62. A layer's
    # backward working set 4·62·(2·64 + 3·176) = 162,688 is below the logits' peak: not added
    # + the int64 index of the scored positions' gather 8·64·60
    assert p["activations"] == 4160 * 62 * 2 + 4 * 64 * 62 + 8 * 64 * 60
    # fp32 logits (no extra copy) + one row-selection gradient + 3 fp32 temporaries of the one row
    assert p["logits"] == 60 * 2048 * 4 + 4 * 4 * 60 * 2048 == 2_457_600
    assert p["reference"] == 0 and p["overhead"] == 0  # precomputed reference; CPU
    # checkpointing: each layer's input; the recomputed layer + its working set (257,920 + 162,688)
    # is still below the logits' peak
    ck = memory_parts(small(**{"model.gradient_checkpointing": True}), shape)
    assert ck["activations"] == 2 * 4 * 64 * 62 + 4 * 64 * 62 + 8 * 64 * 60
    # a vocabulary of 300 (logits peak 60·300·20 = 360,000): the layer's excess is added
    v300 = Shape(64, 2, 4, 4, 176, 300)
    ck300 = memory_parts(small(**{"model.gradient_checkpointing": True}), v300)
    assert ck300["activations"] == 2 * 4 * 64 * 62 + 4 * 64 * 62 + 8 * 64 * 60 + (4160 * 62 + 162_688 - 360_000)
    # dropout 0.05: each of q and v keeps a copy (4 B) and a mask (1 B) of its 64 inputs instead
    dr = memory_parts(small(**{"lora.dropout": 0.05}), shape)
    assert dr["activations"] == (3904 + 2 * 5 * 64) * 62 * 2 + 4 * 64 * 62 + 8 * 64 * 60
    # padded rows (not padding-free): no copies of the rejected response's k and v (-4·64)
    pad = memory_parts(small(**{"dpo.padding_free": False}), shape)
    assert pad["activations"] == (4160 - 256) * 62 * 2 + 4 * 64 * 62 + 8 * 64 * 60
    # and 2 rows (B pairs): two whole-size row-selection gradients, the temporaries of half the positions
    assert pad["logits"] == 60 * 2048 * (4 + 4 * 2 + 4 * 3 / 2)
    # reference every step: its no-grad forward (fp32 logits, a layer's working set) beyond the
    # backward's peak beside the saved logits: 491,520 + 162,688 < 1,966,080, so nothing is added here
    ref = memory_parts(small(**{"dpo.reference": "adapter_disabled"}), shape)
    assert ref["reference"] == 0
    # with a vocabulary of 300 and a wide MLP it is: 2·60·300·4 + 4·62·(2·64 + 3·1760) - 60·300·20
    wide = Shape(64, 2, 4, 4, 1760, 300)
    assert memory_parts(small(**{"dpo.reference": "adapter_disabled"}), wide)["reference"] == 144_000 + 1_341_184 - 360_000
    bf = memory_parts(small(**{"dpo.reference": "adapter_disabled", "deepspeed.precision": "bf16",
                               "model.dtype": "bfloat16"}), shape)
    # bf16: the fp32 copy 4 B + one bf16 row-selection gradient 2 B + 3 fp32 temporaries of the one row
    assert bf["reference"] == 0 and bf["logits"] == 60 * 2048 * (4 + 2 + 12)
    # bf16 layer: 2·(4·64 + 3·64 + 3·176) + the norms' fp32 inputs 2·64·2 + the adapters' input 2·64
    assert bf["activations"] == (1952 + 256 + 128) * 62 * 2 + 4 * 64 * 62 + 8 * 64 * 60
    assert memory_parts(small(**{"dpo.reference": "adapter_disabled", "dpo.loss_type": "simpo"}),
                        shape)["reference"] == 0


def test_fused_head_by_hand():
    """The fused head keeps no [S', V] logits: one tile's fp32 logits and logsumexp temporary
    (8 B x tile x V) in the forward, beside d log p / d hidden (4·64 B) and 8 B per scored position."""
    shape = model_shape(small())[0]
    fused = memory_parts(small(**{"dpo.fused_lm_head": True}), shape)
    assert fused["logits"] == 60 * (4 * 64 + 8) + 60 * 2048 * 8 == 998_880  # S' = 60 < the 512-position tile
    tiled = memory_parts(small(**{"dpo.fused_lm_head": True, "dpo.lm_head_tile_tokens": 16}), shape)
    assert tiled["logits"] == 60 * (4 * 64 + 8) + 16 * 2048 * 8 == 277_984
    # the rest is the [S', V] head's: the layer's backward working set 162,688 is below either peak
    plain = memory_parts(small(), shape)
    assert tiled["activations"] == fused["activations"] == plain["activations"]
    # a reference forward every step: its tile and a layer's working set beside what the head keeps
    ref = memory_parts(small(**{"dpo.fused_lm_head": True, "dpo.lm_head_tile_tokens": 16,
                                "dpo.reference": "adapter_disabled"}), shape)
    assert ref["reference"] == 162_688
    # no completion-only logits, no fused head: the full [T, V] logits as before
    full = small(**{"dpo.fused_lm_head": True, "dpo.completion_only_logits": False})
    assert memory_parts(full, shape)["logits"] == memory_parts(small(**{"dpo.completion_only_logits": False}),
                                                               shape)["logits"]


def test_small_shape_quantized_by_hand():
    shape = model_shape(small())[0]
    nf4 = memory_parts(small(**{"quantization.mode": "4bit", "quantization.double_quant": False}), shape)
    assert nf4["base_weights"] == 100352 * (0.5 + 4 / 64) + 262464 * 4  # absmax fp32 per 64
    dq = memory_parts(small(**{"quantization.mode": "4bit"}), shape)
    assert dq["base_weights"] == pytest.approx(100352 * 0.5 + 1568 + 1568 / 256 * 4 + 262464 * 4)
    q8 = memory_parts(small(**{"quantization.mode": "8bit"}), shape)
    rows = 2 * (64 * 4 + 176 * 2 + 64)  # output features of every linear: one fp32 scale each
    assert q8["base_weights"] == 100352 + 4 * rows + 262464 * 4
    z3 = memory_parts(small(**{"quantization.mode": "4bit", "quantization.compute_dtype": "float32",
                               "deepspeed.stage": 3}), shape)
    assert z3["base_weights"] == pytest.approx(dq["base_weights"] / 2 + 4 * 50176)  # sharded + one gathered layer
    assert z3["lora_params"] == 4 * 4096 / 2
    off = memory_parts(small(**{"deepspeed.offload_optimizer": True}), shape)
    assert off["optimizer_states"] == 0


def test_small_shape_flops_by_hand():
    cfg = small()
    shape = model_shape(cfg)[0]
    lin, attn, head, lora = 2 * 100352 * 62, 2 * 64 * (16 * 16 * 2 - 1) * 2 * 2, 2 * 64 * 2048 * 60, 6 * 4096 * 62
    assert step_flops(cfg, shape) == (lin + attn + head) + (lin + 2 * attn + head + lora)
    ck = small(**{"model.gradient_checkpointing": True, "dpo.gradient_accumulation_steps": 3})
    assert step_flops(ck, shape) == 3 * ((lin + attn + head) + (lin + 2 * attn + head + lora) + (lin + attn))
    ref = small(**{"dpo.reference": "adapter_disabled"})
    assert step_flops(ref, shape) == 2 * (lin + attn + head) + (lin + 2 * attn + head + lora)


def _json(*extra: str) -> dict:
    code = ("import sys; from raydpo.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "validate", "--config", GPU_JOB, "--estimate", "--json", *extra],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout  # exactly one line on stdout
    return json.loads(lines[0])


def test_gpu_recipe_breakdown_4bit_off_and_double_batch():
    base = _json()
    assert base["shape_source"] == "builtin table (meta-llama/Llama-2-7b-hf)"
    assert set(base["parts"]) == {"base_weights", "lora_params", "lora_grads", "optimizer_states", "activations",
                                  "logits", "reference", "overhead"}
    assert base["peak_memory_gib"] == pytest.approx(sum(base["parts"].values()))
    assert base["flops_per_step"] > 0 and base["seconds_per_step"] is None  # no rate given
    # NF4 (no double quant) of 6.74B params: 0.5625 B x 6.48B linear + bf16 embeddings/head ~ 3.9 GiB
    assert 3.5 <= base["parts"]["base_weights"] <= 4.2
    bf16 = _json("--set", "quantization.mode=none")
    assert bf16["parts"]["base_weights"] == pytest.approx(6_738_415_616 * 2 / GIB)  # 12.55 GiB
    assert 8.3 <= bf16["parts"]["base_weights"] - base["parts"]["base_weights"] <= 9.5
    double = _json("--set", "dpo.per_device_batch_size=8")
    # what autograd keeps and the backward's peak above it (a layer's working set: the fused head's
    # tile is below it) scale with the batch
    kept = [r["parts"]["activations"] + r["parts"]["logits"] for r in (base, double)]
    assert kept[1] == pytest.approx(2 * kept[0])
    # the recipe's [S, V] logits (4.4 GiB, the largest activation part) are gone with the fused head
    plain = _json("--set", "dpo.fused_lm_head=false")
    assert plain["parts"]["logits"] > 4 and base["parts"]["logits"] < 0.25
    assert plain["peak_memory_gib"] - base["peak_memory_gib"] > 2
    timed = _json("--gpu", "h100", "--tflops", "500")
    assert timed["gpu"] == "H100-80GB" and timed["tflops"] == 500
    assert timed["seconds_per_step"] == pytest.approx(base["flops_per_step"] / 500e12)


def test_gpu_warning_names_the_knobs(capsys):
    rc = main(["validate", "--config", GPU_JOB, "--estimate", "--json", "--gpu", "A10G",
               "--set", "quantization.mode=none", "--set", "model.gradient_checkpointing=false"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.splitlines()) == 1 and json.loads(out)["peak_memory_gib"] > 24
    assert "exceeds A10G's 24 GiB" in err
    for knob in ("per_device_batch_size", "gradient_accumulation_steps", "max_length", "gradient_checkpointing",
                 "deepspeed.stage=3", "offload", "quantization.mode=4bit"):
        assert knob in err
    rc = main(["validate", "--config", GPU_JOB, "--estimate", "--gpu", "H200"])
    out, err = capsys.readouterr()
    assert rc == 0 and "| base_weights |" in out and "warning" not in err


def test_shape_sources(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 3,
                                                    "num_attention_heads": 4, "intermediate_size": 256,
                                                    "vocab_size": 1000, "tie_word_embeddings": True}))
    shape, src = model_shape(Config().with_overrides({"model.name_or_path": str(folder)}))
    assert shape == Shape(128, 3, 4, 4, 256, 1000, True) and src == f"config.json: {folder / 'config.json'}"
    # a hub id in the Hugging Face cache beats the built-in table; never a network call
    snap = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((folder / "config.json").read_text())
    cfg = load_config(GPU_JOB)
    assert model_shape(cfg, env={"HF_HOME": str(tmp_path / "hf")})[0].hidden == 128
    assert model_shape(cfg, env={"HF_HOME": str(tmp_path / "none")}) == (
        BUILTIN_SHAPES["meta-llama/Llama-2-7b-hf"], "builtin table (meta-llama/Llama-2-7b-hf)")
    unknown = cfg.with_overrides({"model.name_or_path": "someone/unknown-model"})
    with pytest.raises(EstimateError, match="no shape for model 'someone/unknown-model'"):
        model_shape(unknown, env={})
    rc = main(["validate", "--config", GPU_JOB, "--estimate", "--set", "model.name_or_path=someone/unknown-model"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: no shape")
    with pytest.raises(EstimateError, match="unknown GPU"):
        find_gpu("voodoo2")


def test_epoch_rows(tmp_path):
    e = estimate(small(), tflops=1.0)
    # 2000 sample rows x 0.95 train / (2 pairs x 1 accumulation x 2 workers)
    assert e.steps_per_epoch == pytest.approx(2000 * 0.95 / 4)
    assert e.seconds_per_epoch == pytest.approx(e.steps_per_epoch * e.flops_per_step / 1e12)
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 40)
    assert estimate(small(**{"data.source": str(f)}), tflops=1.0).steps_per_epoch == pytest.approx(40 * 0.95 / 4)
    assert estimate(small(**{"data.max_rows": 400}), tflops=1.0).steps_per_epoch == pytest.approx(95)
    hub = estimate(load_config(GPU_JOB), tflops=100.0)
    assert hub.seconds_per_epoch is None and any("per-epoch time omitted" in n for n in hub.notes)


def test_validate_without_estimate_unchanged(capsys):
    assert main(["validate", "--config", GPU_JOB]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    assert main(["validate", "--config", GPU_JOB, "--json"]) == 2  # --json belongs to --estimate


def test_benchmark_pairs_are_the_estimates_worst_case():
    """The memory benchmark measures pairs of exactly the estimate's token counts (T, S), in the
    layout every row trains (the default: padding-free, checkpointed rows included)."""
    from raydpo.benchmarks.memory import DEFAULT_ROWS, DEFAULT_SHAPE, _batch, format_rows, row_config

    for quant, ckpt, b in DEFAULT_ROWS:
        cfg = row_config(DEFAULT_SHAPE, b, 64, quant, ckpt)
        batch = _batch(cfg)
        T, S, _ = tokens(cfg)
        assert int((batch["seq_ids"] >= 0).sum()) == T and int((batch["score_slot"] >= 0).sum()) == S
        assert "spans" in batch
    row = {"arm": "raydpo, fused head", "shape": "1,2,3,4,5", "quant": "none", "checkpointing": "off", "batch": 1,
           "max_length": 8, "tokens": 15, "estimate_mib": 1.0, "measured_mib": 1.0, "error_pct": 1.5}
    assert "| +1.5 |" in format_rows([row])
    assert "| — | 2.0 | — |" in format_rows([{**row, "arm": "TRL", "estimate_mib": None, "measured_mib": 2.0,
                                              "error_pct": None}])  # TRL's row: no estimate


def test_data_passes_count_what_the_run_reads_tokenizes_and_scores():
    """The recipe on 7.4M pairs: one read of every row; 1000 steps x 4 accumulation x 16 pairs
    tokenized and scored, plus 100 eval batches x 16; the reference pass's seconds are those
    pairs' forwards over the workers, against the whole source's."""
    from raydpo.orchestration.estimate import forward_flops

    cfg = load_config(GPU_JOB).with_overrides({"data.max_rows": 7_400_000})
    e = estimate(cfg, tflops=100.0)
    p = e.passes
    assert (p["source_rows"], p["tokenize_train"], p["tokenize_eval"]) == (7_400_000, 64_000, 1_600)
    assert p["score"] == 65_600
    pair = forward_flops(cfg, model_shape(cfg)[0]) / 4
    assert p["reference_s"] == pytest.approx(65_600 * pair / (100e12 * 4))
    assert p["whole_split_reference_s"] == pytest.approx(7_400_000 * pair / (100e12 * 4))
    assert "score 65,600 pairs" in format_estimate(e)
    # past epoch 0 every pair is read; a reference-free loss scores nothing
    small_src = estimate(cfg.with_overrides({"data.max_rows": 10_000}), tflops=100.0).passes
    assert small_src["tokenize_train"] == 10_000 - 50 and small_src["tokenize_eval"] == 50
    assert estimate(cfg.with_overrides({"dpo.loss_type": "simpo"}), tflops=100.0).passes["score"] == 0
