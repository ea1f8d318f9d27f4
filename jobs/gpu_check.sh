#!/usr/bin/env bash
# One-shot GPU check: a random-init model of Llama-2-7B's shape (all 32 layers, built on the GPU
# in bf16 and saved once), trained a few DPO steps by raydpo's standalone loop under torchrun (NF4
# with bf16 compute, LoRA r8 a16 on q_proj/v_proj, max_length 1024, gradient checkpointing,
# deepspeed.enabled=false: plain torch, no DeepSpeed needed) and by TRL 1.16's DPOTrainer
# (precompute_ref_log_probs=True) on the same model and the same token ids; prints per system
# tokens/s, MFU (raydpo.orchestration.estimate.step_flops, the formula `raydpo validate --estimate` uses), peak
# memory (torch.cuda.max_memory_allocated) and the memory estimate's error_pct.
# Steps: raydpo/benchmarks/gpu_check.py. Defaults: 6 steps at batch 4 (about 10 minutes in all
# was the budget: a 13 GiB model build and save, two NF4 loads, two reference passes).
#
# For a GPU host with torch (CUDA), transformers, peft and accelerate (hence numpy, pyyaml,
# safetensors, tokenizers) but no Ray, DeepSpeed, bitsandbytes or MLflow, and no internet.
# What is carried to it (64 MiB at most), sizes as downloaded on 2026-12-02:
#   - this repository's tracked files (git ls-files: 3.3 MB), run from source (PYTHONPATH),
#     not installed: nothing is built on the host
#   - a folder of wheels, installed with pip --no-deps --no-index:
#       bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl   43,139,553 B (41.1 MiB)
#       trl-1.16.0-py3-none-any.whl                                 948,205 B (0.9 MiB)
#       pydantic, pydantic-core, annotated-types, typing-inspection (raydpo's config; only where
#       the host lacks pydantic 2; pydantic-core is per Python version: download it with
#       --python-version of the host)          2,780,878 B (2.7 MiB) for CPython 3.11
#   Made here with:
#       pip download --no-deps -d wheels bitsandbytes==0.50.2 trl==1.16.0 \
#           pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
#   In all 44.7 MiB of wheels + 3.2 MiB of repository = 47.9 MiB. TRL also imports `datasets`
#   (5.2.0 with pyarrow 25, pandas 3.1, dill, multiprocess, xxhash, fsspec: 61.0 MiB of wheels for
#   CPython 3.11, over the budget); where the host lacks it, the TRL half is skipped with one line and the
#   raydpo half still runs.
#
# Usage (on the GPU host, from the repository root or anywhere):
#   jobs/gpu_check.sh WHEELS_DIR          # or WHEELS=WHEELS_DIR jobs/gpu_check.sh
#   SMOKE=1 jobs/gpu_check.sh             # any CPU machine: the tiny shape, fp32, NF4 on the CPU,
#                                         # 2 steps at batch 1, max_length 128 (checks the logic)
# Env: OUT (work folder, default ./gpu_check_out; the model is built once and kept there), STEPS,
# BATCH, TFLOPS (the peak for MFU; default: the GPU's entry in raydpo.orchestration.estimate.GPUS), NPROC
# (torchrun processes, default 1; > 1 trains with DDP), PYTHON (default python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
WHEELS="${1:-${WHEELS:-}}"
OUT="${OUT:-$PWD/gpu_check_out}"
SMOKE="${SMOKE:-0}"
say() { echo "[gpu_check] $*"; }

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { say "wheels folder not found: $WHEELS"; exit 2; }
  shopt -s nullglob
  whls=("$WHEELS"/*.whl)
  [ ${#whls[@]} -gt 0 ] || { say "no .whl files in $WHEELS"; exit 2; }
  say "installing ${#whls[@]} wheels from $WHEELS (--no-deps --no-index)"
  "$PY" -m pip install -q --no-deps --no-index "${whls[@]}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

prep=(--out "$OUT")
[ "$SMOKE" = 1 ] && prep+=(--smoke)
[ -n "${STEPS:-}" ] && prep+=(--steps "$STEPS")
[ -n "${BATCH:-}" ] && prep+=(--batch "$BATCH")
if [ "$SMOKE" != 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "no CUDA device seen by torch (SMOKE=1 runs the CPU smoke mode)"; exit 2; }
fi
# installed? (found, not imported: an import of these costs ~7 s on 2 cores, and the runs import them anyway)
has() { "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)' "$@"; }
has bitsandbytes peft transformers || { say "bitsandbytes/peft/transformers missing: pass the wheels folder"; exit 2; }

t0=$(date +%s)
"$PY" -m raydpo.benchmarks.gpu_check prepare "${prep[@]}"
say "prepare: $(( $(date +%s) - t0 )) s"

t1=$(date +%s)
if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-1}" -m raydpo.train.standalone \
    --config "$OUT/gpu_check.yaml" --stage dpo > "$OUT/raydpo.log" 2> "$OUT/raydpo.err"; then
  tail -n 30 "$OUT/raydpo.err"; say "raydpo standalone run failed (log: $OUT/raydpo.err)"; exit 1
fi
say "raydpo standalone: $(( $(date +%s) - t1 )) s"

rm -f "$OUT/trl.json"
if has trl datasets; then
  t2=$(date +%s)
  if ! "$PY" -m raydpo.benchmarks.gpu_check trl --out "$OUT" > "$OUT/trl.log" 2>&1; then
    tail -n 30 "$OUT/trl.log"; say "TRL run failed (log: $OUT/trl.log)"; exit 1
  fi
  say "TRL: $(( $(date +%s) - t2 )) s"
else
  say "TRL skipped: trl or datasets is not installed here (datasets+pyarrow+pandas do not fit the 64 MiB carried)"
fi

rep=(--out "$OUT")
[ -n "${TFLOPS:-}" ] && rep+=(--tflops "$TFLOPS")
"$PY" -m raydpo.benchmarks.gpu_check report "${rep[@]}"
say "done in $(( $(date +%s) - t0 )) s; results: $OUT/report.json"
