"""The GPU check (``jobs/gpu_check.sh``) runs what users of ``jobs/stack_llama_2_gpu.yaml`` run —
its DeepSpeed bf16 engine, NF4 with bf16 compute, one process per GPU over NCCL — and its
arithmetic on a GPU run's outputs is the estimate's own. No GPU here: the GPU run's config is
checked by DeepSpeed's and raydpo's own validation, the runner's backend choice with CUDA faked,
and the report on metric lines written as the loop writes them on CUDA."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from raydpo.benchmarks.gpu_check import check_config, layout, recipe_config, report
from raydpo.config import resolve_precision
from raydpo.orchestration.estimate import BUILTIN_SHAPES, CUDA_CONTEXT_GIB, estimate, model_shape, step_flops
from raydpo.train.deepspeed import build_ds_config, comm_backend, engine_cast_dtype

NPROC = 2  # a two-GPU host: the case the lent one-GPU machines never run


def _gpu_cfg(tmp_path, nproc: int = NPROC, steps: int = 3, batch: int = 4):
    """The config the GPU run writes, on a model folder of Llama-2-7B's config.json."""
    s = BUILTIN_SHAPES["meta-llama/Llama-2-7b-hf"]
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "intermediate_size": s.intermediate, "vocab_size": s.vocab}))
    return check_config(str(model), tmp_path, smoke=False, steps=steps, batch=batch, max_length=1024, nproc=nproc)


def test_the_gpu_run_trains_the_recipes_engine_in_bf16_on_every_gpu(tmp_path):
    cfg, recipe = _gpu_cfg(tmp_path), recipe_config()
    # the recipe's sections as users run them (only the model folder is the check's own)
    assert cfg.model.model_copy(update={"name_or_path": recipe.model.name_or_path}) == recipe.model
    assert (cfg.quantization, cfg.lora, cfg.deepspeed) == (recipe.quantization, recipe.lora, recipe.deepspeed)
    assert (cfg.dpo.lr, cfg.dpo.beta, cfg.dpo.loss_type) == (recipe.dpo.lr, recipe.dpo.beta, recipe.dpo.loss_type)
    assert cfg.deepspeed.enabled and cfg.deepspeed.stage == 2 and resolve_precision(cfg, True) == "bf16"
    q = cfg.quantization
    assert (q.mode, q.quant_type, q.compute_dtype) == ("4bit", "nf4", "bfloat16")
    assert cfg.model.gradient_checkpointing and cfg.data.max_length == recipe.data.max_length == 1024
    assert engine_cast_dtype(cfg, use_gpu=True) == "bfloat16"  # the policy loads in DeepSpeed's bf16
    # one worker per GPU, joined over NCCL; the batch per process is the recipe's
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == NPROC and comm_backend(cfg.scaling.use_gpu) == "nccl"
    assert layout(cfg) == {"engine": "DeepSpeed ZeRO-2 bf16", "processes": NPROC, "backend": "nccl",
                           "per_process_batch": recipe.dpo.per_device_batch_size,
                           "global_batch": NPROC * recipe.dpo.per_device_batch_size}


def test_deepspeed_accepts_the_gpu_runs_engine_config(tmp_path, monkeypatch):
    """The dict `build_engine` hands ``deepspeed.initialize`` on the GPU hosts, parsed by DeepSpeed
    0.19.8's own config class as ``NPROC`` NCCL ranks would see it."""
    import deepspeed.runtime.config as dsc

    cfg = _gpu_cfg(tmp_path)
    ds = build_ds_config(cfg, cfg.dpo, use_gpu=True, world_size=cfg.scaling.num_workers)
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dsc.dist, "get_world_size", lambda *a, **k: NPROC)
    parsed = dsc.DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_optimization_stage == 2 and parsed.zero_config.overlap_comm
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps, parsed.train_batch_size) == (
        4, 1, 4 * NPROC)


def test_the_written_config_passes_raydpo_validate_estimate(tmp_path, capsys):
    """What the script runs before any training: the YAML as ``prepare`` writes it, loaded by the
    config loader and estimated by ``raydpo validate --estimate``; it fits one H100's 80 GiB."""
    from raydpo.benchmarks.gpu_check import _long_rows
    from raydpo.cli import main

    cfg = _gpu_cfg(tmp_path)
    path = tmp_path / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _long_rows(28, chars=200)))
    assert main(["validate", "--config", str(path), "--estimate", "--json", "--gpu", "H100-80GB"]) == 0
    est = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert est["precision"] == "bf16" and est["world_size"] == NPROC and est["shape"]["layers"] == 32
    assert est["peak_memory_gib"] == pytest.approx(estimate(cfg).peak_memory_gib) and not est["warnings"]
    assert est["peak_memory_gib"] < est["gpu_memory_gib"]


def test_the_torchrun_runner_joins_nccl_on_a_gpu_host(tmp_path, monkeypatch):
    """`raydpo.train.standalone.init_distributed` with CUDA seen: the GPU run's process group is NCCL."""
    import torch
    import torch.distributed as dist

    from raydpo.train import engine, standalone

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend))
    monkeypatch.setattr(engine, "env_from_torch", lambda use_gpu: seen.update(use_gpu=use_gpu) or "env")
    assert standalone.init_distributed(_gpu_cfg(tmp_path)) == "env"
    assert seen == {"backend": "nccl", "use_gpu": True}


@pytest.mark.parametrize("device_name, key", [("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-80GB")])
def test_mfu_takes_the_lent_gpus_peak_from_torchs_name_for_it(monkeypatch, device_name, key):
    """The report's default peak rate: the `GPUS` entry of ``torch.cuda.get_device_name(0)``."""
    import torch

    from raydpo.benchmarks.gpu_check import _peak_tflops
    from raydpo.orchestration.estimate import GPUS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: device_name)
    assert _peak_tflops(None) == (GPUS[key].tflops, key)
    assert _peak_tflops(500.0) == (500.0, "--tflops")


def test_the_smoke_mode_runs_the_same_engine_on_the_cpu(tmp_path):
    """``SMOKE=1``: DeepSpeed bf16 and NF4 with bf16 compute on the CPU over gloo; only the
    device, the sizes and the paths differ from the GPU run."""
    gpu = _gpu_cfg(tmp_path)
    smoke = check_config(gpu.model.name_or_path, tmp_path, smoke=True, steps=2, batch=1, max_length=128, nproc=2)
    assert resolve_precision(smoke, False) == "bf16" and engine_cast_dtype(smoke, use_gpu=False) == "bfloat16"
    assert comm_backend(smoke.scaling.use_gpu) == "gloo"
    a, b = gpu.flat(), smoke.flat()
    assert {k for k in a if a[k] != b[k]} == {"scaling.use_gpu", "data.max_length", "data.max_prompt_length",
                                              "dpo.max_steps", "dpo.per_device_batch_size"}


def _run_outputs(tmp_path, tokens_per_pair: float):
    """A two-GPU run's files: the config, the prepared ids, rank 0's metric lines (tokens and pairs
    of both ranks, rank 0's peak) and TRL's result."""
    cfg = _gpu_cfg(tmp_path)
    (tmp_path / "gpu_check.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    pairs = [{"prompt_input_ids": [1] * 10, "chosen_input_ids": [5] * 1014, "rejected_input_ids": [6] * 1014}] * 28
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    g = 4 * NPROC
    lines = [{"step": k, "train/loss": 0.69 - 0.01 * k, "train/samples_per_s": g / t, "train/step_time_s": t,
              "train/tokens_per_s": g * tokens_per_pair / t, "train/peak_memory_gb": 9.5}
             for k, t in ((1, 9.0), (2, 2.0), (3, 2.2))]
    (tmp_path / "raydpo.log").write_text("[dpo] a progress line\n" + "".join(json.dumps(x) + "\n" for x in lines))
    trl = {"trl_version": "1.16.0", "bf16": True, "processes": NPROC, "tokens_per_s": 8000.0, "pairs_per_s": 3.9,
           "rows_identical": True, "window": {"first_step": 1, "last_step": 3, "seconds": 5.0},
           "cuda_peak_gib": 12.0, "losses": [{"step": 1, "loss": 0.69}]}
    (tmp_path / "trl.json").write_text(json.dumps(trl))
    return cfg


def test_mfu_and_error_pct_of_a_gpu_run_use_the_estimates_own_numbers(tmp_path, capsys):
    cfg = _run_outputs(tmp_path, tokens_per_pair=2 * 10 + 2 * 1014)
    ours, trl = report(tmp_path, tflops=989.0)
    flops = step_flops(cfg, model_shape(cfg)[0])  # one process's step: MFU per GPU
    assert ours["step_s"] == pytest.approx(2.1)  # step 1 (warm-up) left out
    assert ours["mfu"] == pytest.approx(flops / 2.1 / 989e12) and trl["mfu"] == pytest.approx(flops / 2.5 / 989e12)
    est = estimate(cfg).peak_memory_gib - CUDA_CONTEXT_GIB  # the context is outside the allocator
    assert ours["error_pct"] == pytest.approx(100 * (est - 9.5) / 9.5) and trl["error_pct"] is None
    assert ours["same_tokens"] and ours["processes"] == trl["processes"] == NPROC
    assert ours["tokens_per_s"] == pytest.approx(NPROC * 4 * 2048 / 2.1, rel=0.05)  # both ranks' tokens
    out = capsys.readouterr().out
    assert "[gpu_check] raydpo standalone (DeepSpeed ZeRO-2 bf16, 2 processes, nccl): tokens/s" in out
    assert "[gpu_check] TRL 1.16.0 DPOTrainer (precompute_ref_log_probs, bf16, 2 processes DDP): tokens/s" in out
    assert f"error_pct {ours['error_pct']:+.1f}" in out and "fed the prepared ids: yes" in out
    assert "batch 4 per process x 2 processes = 8" in out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["layout"]["backend"] == "nccl" and all(math.isfinite(r["mfu"]) for r in saved["rows"])


def test_a_run_that_trained_other_tokens_than_the_prepared_ones_is_flagged(tmp_path, capsys):
    _run_outputs(tmp_path, tokens_per_pair=1500)
    ours, _ = report(tmp_path, tflops=989.0)
    assert not ours["same_tokens"] and "fed the prepared ids: NO" in capsys.readouterr().out


def test_the_standalone_path_needs_no_deepspeed_ray_or_mlflow(tmp_path):
    """On a host without them (each import blocked): the standalone runner and the loop import, and
    ``deepspeed.enabled: false`` builds an engine that trains a step."""
    import subprocess
    import sys

    code = """
import sys
for m in ("deepspeed", "ray", "mlflow"):
    sys.modules[m] = None
import torch
import raydpo.train.standalone
from raydpo.config import Config
from raydpo.train.engine import WorkerEnv, build_engine
net = torch.nn.Linear(4, 1)
cfg = Config().with_overrides({"deepspeed.enabled": False, "dpo.gradient_accumulation_steps": 1})
engine, opt, sched = build_engine(net, cfg, cfg.dpo, WorkerEnv(0, 1, torch.device("cpu"), False))
before = net.weight.detach().clone()
engine.backward(engine(torch.ones(2, 4)).sum())
engine.step()
assert not torch.equal(before, net.weight) and engine.global_steps == 1
loaded = [m for m in ("deepspeed", "ray", "mlflow") if sys.modules.get(m) is not None]
print("ok", loaded)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"
