"""The training loop without Ray, under torchrun: how the GPU path is checked on machines that
have torch but no Ray (2 gloo ranks on CPU here; bf16 + 4-bit + NCCL where CUDA exists)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["data.sample_size=300", "sft.max_steps=3", "sft.log_every=1", "sft.eval_every=3", "sft.save_every=3",
         "dpo.max_steps=3", "dpo.log_every=1", "dpo.eval_every=3", "dpo.save_every=3"]


def _torchrun(tmp_path: Path, stage: str, nproc: int, extra: list[str], generations: list | None = None) -> list[dict]:
    sets = [a for s in [*SHORT, f"run.storage_path={tmp_path / 'runs'}", "run.name=sa",
                        f"model.cache_dir={REPO / '.raydpo_cache'}", *extra] for a in ("--set", s)]
    r = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
         "-m", "raydpo.train.standalone", "--config", str(REPO / "jobs" / "demo_cpu.yaml"), "--stage", stage, *sets],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if generations is not None:
        from raydpo.train.standalone import GENERATIONS_PREFIX

        generations += [json.loads(x[len(GENERATIONS_PREFIX):]) for x in r.stdout.splitlines()
                        if x.startswith(GENERATIONS_PREFIX)]
    assert [m["step"] for m in lines] == [1, 2, 3]  # rank 0 logs once per step, no duplicates
    adapter = tmp_path / "runs" / f"sa-{stage}-standalone" / "step_3" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    return lines


@pytest.fixture(scope="module")
def deepspeed_dpo(tmp_path_factory):
    """DPO on 2 gloo ranks under DeepSpeed ZeRO-2 (the default engine): its metric lines and the
    generations rank 0 printed. Checked on its own, then compared with the plain engine."""
    gens: list = []
    return _torchrun(tmp_path_factory.mktemp("ds"), "dpo", 2, [], gens), gens


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_torchrun_two_cpu_ranks_sft_and_dpo_without_ray(tmp_path, deepspeed_dpo):
    """SFT under ZeRO-3 over 4-bit LoRA (the partitioned weights gathered to save the adapter), DPO
    under ZeRO-2, on 2 gloo ranks without Ray."""
    from safetensors.torch import load_file

    from raydpo.config import load_config

    vocab = load_config(REPO / "jobs" / "demo_cpu.yaml").model.tiny.vocab_size
    sft = _torchrun(tmp_path, "sft", 2, ["deepspeed.stage=3", "deepspeed.stage3_param_persistence_threshold=0"])
    assert all(math.isfinite(m["train/loss"]) for m in sft) and "eval/loss" in sft[-1]
    assert sft[-1]["eval/loss"] < math.log(vocab)  # learned something vs. uniform over the vocabulary
    saved = load_file(tmp_path / "runs" / "sa-sft-standalone" / "step_3" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in saved.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in lora_b)  # whole tensors, not empty ZeRO-3 partitions
    assert any(t.abs().sum() > 0 for t in lora_b)  # trained off LoRA's zero init
    dpo, gens = deepspeed_dpo
    assert abs(dpo[0]["train/loss"] - math.log(2)) < 0.01  # step-0 sanity holds without Ray too
    assert [g["step"] for g in gens] == [3] and len(gens[0]["rows"]) == 4  # rank 0 alone prints the table
    assert {"eval/rewards/accuracies", "eval/rewards/margins"} <= set(dpo[-1])
    assert dpo[-1]["train/tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_torchrun_gpu_bf16_4bit_dpo(tmp_path):
    """Where CUDA exists: bf16 compute, NF4 stored as bf16 (what ZeRO-3 and DeepSpeed bf16 need), NCCL."""
    import torch

    assert torch.cuda.is_available(), "the gpu tier needs CUDA (run it with `pytest -m gpu` on a GPU host)"
    dpo = _torchrun(tmp_path, "dpo", 1, ["scaling.use_gpu=true", "deepspeed.precision=bf16",
                                         "quantization.compute_dtype=bfloat16"])
    assert abs(dpo[0]["train/loss"] - math.log(2)) < 0.01
    assert dpo[-1]["train/peak_memory_gb"] > 0


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_two_ranks_without_deepspeed_train_like_deepspeed(tmp_path, deepspeed_dpo):
    """``deepspeed.enabled=false`` across 2 gloo ranks (the plain engine under DDP): every step's
    global loss and reward margin equal DeepSpeed ZeRO-2's on the same stream."""
    ds, _ = deepspeed_dpo
    plain = _torchrun(tmp_path, "dpo", 2, ["deepspeed.enabled=false"])
    assert abs(plain[0]["train/loss"] - math.log(2)) < 1e-4
    for a, b in zip(plain, ds):
        for k in ("train/loss", "train/rewards/margins", "eval/loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
