"""The GPU check's arithmetic on a GPU run's outputs (no GPU here: the standalone run's metric lines
are written as the loop writes them on CUDA): MFU is `raydpo.orchestration.estimate.step_flops` over the step
time and the peak rate, error_pct compares ``torch.cuda.max_memory_allocated`` with the estimate
less the CUDA context, and the tokens the loop counted are checked against the prepared ids."""

from __future__ import annotations

import json

import pytest
import yaml

from raydpo.benchmarks.gpu_check import check_config, report
from raydpo.orchestration.estimate import BUILTIN_SHAPES, CUDA_CONTEXT_GIB, estimate, model_shape, step_flops


def _setup(tmp_path, tokens_per_pair: float):
    s = BUILTIN_SHAPES["meta-llama/Llama-2-7b-hf"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "intermediate_size": s.intermediate, "vocab_size": s.vocab}))
    cfg = check_config(str(model), tmp_path, smoke=False, steps=3, batch=4, max_length=1024)
    (tmp_path / "gpu_check.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    pairs = [{"prompt_input_ids": [1] * 10, "chosen_input_ids": [5] * 1014, "rejected_input_ids": [6] * 1014}] * 12
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    lines = [{"step": k, "train/loss": 0.69 - 0.01 * k, "train/samples_per_s": 4 / t, "train/step_time_s": t,
              "train/tokens_per_s": 4 * tokens_per_pair / t, "train/peak_memory_gb": 9.5}
             for k, t in ((1, 9.0), (2, 2.0), (3, 2.2))]
    (tmp_path / "raydpo.log").write_text("[dpo] a progress line\n" + "".join(json.dumps(x) + "\n" for x in lines))
    return cfg


def test_mfu_and_error_pct_of_a_gpu_run_use_the_estimates_own_numbers(tmp_path, capsys):
    cfg = _setup(tmp_path, tokens_per_pair=2 * 10 + 2 * 1014)
    assert not cfg.deepspeed.enabled and cfg.scaling.use_gpu and cfg.model.gradient_checkpointing
    (row,) = report(tmp_path, tflops=989.0)
    flops = step_flops(cfg, model_shape(cfg)[0])
    assert row["step_s"] == pytest.approx(2.1)  # step 1 (warm-up) left out
    assert row["mfu"] == pytest.approx(flops / 2.1 / 989e12)
    est = estimate(cfg).peak_memory_gib - CUDA_CONTEXT_GIB  # the context is outside the allocator
    assert row["error_pct"] == pytest.approx(100 * (est - 9.5) / 9.5)
    assert row["same_tokens"]
    out = capsys.readouterr().out
    assert f"error_pct {row['error_pct']:+.1f}" in out and "fed the prepared ids: yes" in out


def test_a_run_that_trained_other_tokens_than_the_prepared_ones_is_flagged(tmp_path, capsys):
    _setup(tmp_path, tokens_per_pair=1500)
    (row,) = report(tmp_path, tflops=989.0)
    assert not row["same_tokens"] and "fed the prepared ids: NO" in capsys.readouterr().out


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
