"""``jobs/gpu_check.sh`` in its CPU smoke mode, on a "host" where Ray and MLflow cannot be imported
(a ``sitecustomize`` puts None in ``sys.modules`` for them, in every process the script starts):
the script's logic end to end — wheels folder check, prepare, ``raydpo validate --estimate`` on
the written config, the standalone loop under torchrun on the recipe's engine (DeepSpeed ZeRO-2
bf16, NF4 with bf16 compute) in 2 gloo processes, TRL's DPOTrainer in bf16 on the same ids in 2
DDP processes, the report lines."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "jobs" / "gpu_check.sh"
BLOCKED = ("ray", "mlflow")  # DeepSpeed is the production engine: the GPU host gets it carried


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\nfor m in %r:\n    sys.modules[m] = None  # import m raises ImportError\n" % (BLOCKED,))
    # PATH already has the venv's bin first (tests/conftest.py)
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def test_a_bad_wheels_folder_is_one_clear_line(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nowhere")], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout.strip().splitlines() == [f"[gpu_check] wheels folder not found: "
                                                                    f"{tmp_path / 'nowhere'}"]


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_the_gpu_check_smoke_mode_runs_the_production_engine_without_ray_or_mlflow(tmp_path):
    env = _env(tmp_path, SMOKE="1", OUT=str(tmp_path / "out"), TFLOPS="1")
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "None in sys.modules" in probe.stderr  # the block holds in the script's processes
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=380, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("[gpu_check] ")]
    out = tmp_path / "out"

    # the standalone loop trained through DeepSpeed bf16: one metrics line per step, ln 2 first
    hist = [json.loads(x) for x in (out / "raydpo.log").read_text().splitlines() if x.startswith("{")]
    assert [h["step"] for h in hist] == [1, 2] and abs(hist[0]["train/loss"] - math.log(2)) < 1e-4
    assert (out / "runs" / "gpu-check-dpo-standalone" / "step_2" / "adapter" / "adapter_config.json").exists()

    rows = {}
    for x in lines:
        m = re.match(r"\[gpu_check\] (raydpo standalone|TRL [\d.]+ DPOTrainer) \(([^)]*)\): (.*)", x)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    assert set(rows) == {"raydpo standalone", "TRL 1.16.0 DPOTrainer"}, lines
    report = json.loads((out / "report.json").read_text())
    from raydpo.config import load_config
    from raydpo.orchestration.estimate import model_shape, step_flops

    cfg = load_config(out / "gpu_check.yaml")
    assert cfg.deepspeed.enabled and cfg.deepspeed.precision == "bf16" and cfg.quantization.mode == "4bit"
    assert cfg.quantization.compute_dtype == "bfloat16" and cfg.dpo.max_steps == 2 and cfg.scaling.num_workers == 2
    assert rows["raydpo standalone"][0] == "DeepSpeed ZeRO-2 bf16, 2 processes, gloo"
    assert rows["TRL 1.16.0 DPOTrainer"][0] == "precompute_ref_log_probs, bf16, 2 processes DDP"
    assert (out / "estimate.txt").read_text().startswith(f"{out / 'gpu_check.yaml'}: OK")
    assert report["flops_per_step"] == step_flops(cfg, model_shape(cfg)[0])  # the one formula
    for r_ in report["rows"]:
        assert r_["tokens_per_s"] > 0 and r_["same_tokens"] and all(math.isfinite(x) for x in r_["losses"])
        assert r_["processes"] == 2
        assert r_["mfu"] == pytest.approx(report["flops_per_step"] / r_["step_s"] / 1e12)  # TFLOPS=1
        assert r_["peak_gib"] is None and r_["error_pct"] is None  # no CUDA allocator on the CPU
    for _, text in rows.values():
        assert re.search(r"tokens/s [\d.]+ .*MFU [\d.e+-]+%.*peak memory n/a.*error_pct n/a", text), text
    flops_line = "[gpu_check] FLOPs per step and process (raydpo.orchestration.estimate.step_flops): "
    assert any(x.startswith(flops_line) for x in lines)
