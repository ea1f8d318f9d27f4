"""Llama-2-7B's layer shape through the real code on CPU: what a GPU run will meet, minus the GPU.

One decoder layer of Llama-2-7B (hidden 4096, 32 heads, intermediate 11008) with its 32,000-row
vocabulary, random-init, loaded as `jobs/stack_llama_2_gpu.yaml` loads it (`raydpo.models.factory.load_model`:
NF4 4-bit, LoRA r8 alpha 16 on q_proj/v_proj, dropout 0.05, gradient checkpointing; fp32 compute
on CPU where the recipe says bf16), trained 2 DPO steps at batch 1, accumulation 1, max_length 512
by the training loop itself (`raydpo.train.loop.run_stage` on DeepSpeed ZeRO-2 fp32, one gloo
rank, the reference log-probs computed first by the standalone runner's `add_reference`), in a
fresh process measured as `python -m raydpo.benchmarks.memory` measures (its `run_row`).

Tokens: the model's vocabulary is the shape's 32,000 (embeddings, LM head and logits are full
size), but the pairs' ids are drawn within the tiny local tokenizer's 2,048 ids (no 32k Llama
tokenizer is available offline): rows 2,048-31,999 of the embedding are never looked up, which
changes no tensor size the estimate counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAPE_7B_LAYER = (4096, 1, 32, 11008, 32000)  # hidden, layers, heads, intermediate, vocab
WARMUP = (64, 1, 4, 176, 2048)


def _scratch() -> Path:
    """Where the two random-init model folders go: memory-backed /dev/shm when it has room (the
    7B-shaped folder is 1.6 GB of fp32 weights, ~13 s to write to this machine's disk; the child
    reads them from the page cache either way), else a temporary folder."""
    shm = Path("/dev/shm")
    room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 * 2**30
    return Path(tempfile.mkdtemp(prefix="raydpo-7b-", dir=shm if room else None))


def measure_row() -> dict:
    """The row: both folders built, then `run_row` (a fresh process, as `python -m
    raydpo.benchmarks.memory` measures). What `python tests/integration/test_7b_shape.py` prints,
    the last line of its stdout: the integration tier runs it in the background
    (tests/integration/conftest.py), beside the unit tier, with one torch thread."""
    from raydpo.benchmarks.memory import _build_folder, row_config, run_row
    from raydpo.config import Config

    t0 = time.perf_counter()
    scratch = _scratch()
    try:
        tok = Config().with_overrides({"model.cache_dir": str(REPO / ".raydpo_cache")})
        _build_folder(row_config(WARMUP, 1, 16, "4bit", True), str(scratch / "warm"), tokenizer_from=tok)
        _build_folder(row_config(SHAPE_7B_LAYER, 1, 512, "4bit", True), str(scratch / "m"), tokenizer_from=tok)
        r = run_row(SHAPE_7B_LAYER, 1, 512, "4bit", True, str(scratch / "m"), str(scratch / "warm"),
                    29500 + os.getpid() % 1000, loop=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_one_llama_2_7b_layer_trains_two_dpo_steps_at_ln2_within_the_memory_estimate(seven_b_row):
    r = seven_b_row
    print(f"7B-layer row: {r}")

    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert abs(r["losses"][0] - math.log(2)) < 1e-4  # the fresh adapter: policy == reference at step 0
    assert r["losses"][1] != pytest.approx(r["losses"][0], abs=1e-4)  # and step 1 trained it
    assert r["tokens"] == 2 * 512 - 1  # the worst-case pair the estimate counts: 1-token prompt, shared
    # the estimate of this very config (4-bit layer, full-size fp32 embeddings and LM head, the fused
    # head's one [512, 32000] fp32 tile + its temporary, 125 MiB, no [1022, 32000] logits) ...
    assert 1000 < r["parts_mib"]["base_weights"] < 1200 and 125 < r["parts_mib"]["logits"] < 160
    assert abs(r["error_pct"]) <= 25, r  # ... within 25% of the measured peak


if __name__ == "__main__":
    print(json.dumps(measure_row()), flush=True)
    sys.exit(0)
