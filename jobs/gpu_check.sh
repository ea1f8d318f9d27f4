#!/usr/bin/env bash
# One-shot GPU check of the production path: a random-init model of Llama-2-7B's shape (all 32
# layers, built on the GPU in bf16 and saved once) trained a few DPO steps
#   - by raydpo as users of jobs/stack_llama_2_gpu.yaml train it: that file's model, quantization,
#     LoRA, DeepSpeed and DPO sections (NF4 with bf16 compute, gradient checkpointing, LoRA r8 a16
#     dropout 0.05 on q_proj/v_proj, DeepSpeed ZeRO-2 bf16), max_length 1024, one process per GPU
#     under torchrun (raydpo.train.standalone: the Ray workers' loop and engine without Ray; NCCL);
#   - by TRL 1.16's DPOTrainer (precompute_ref_log_probs=True) on the same token ids, the same NF4
#     model, bf16, the same LoRA, batch per process and process count (torchrun when above 1);
# and prints per system tokens/s (all processes), MFU (raydpo.orchestration.estimate.step_flops,
# the formula `raydpo validate --estimate` uses), peak memory (torch.cuda.max_memory_allocated) and
# the memory estimate's error_pct. The written config is checked by `raydpo validate --estimate`
# before any training. Steps: raydpo/benchmarks/gpu_check.py.
#
# Defaults: 6 steps at the recipe's batch (4 pairs per process), one process per GPU. Sized for
# one device call of at most 10 minutes (installs, the 13 GiB model built and saved once, each
# system's imports, NF4 load, reference pass and steps, the report); not yet run on a GPU. The
# loads dominate, not the steps: where it runs long, keep OUT between calls (the model is built
# once) rather than lowering STEPS.
#
# For a GPU host with torch (CUDA), transformers, peft, accelerate, numpy, pyyaml, safetensors,
# tokenizers, setuptools and wheel, and no internet. This workplace's GPU machines (image 'cuda':
# CPython 3.12, torch 2.11, transformers 5.17, accelerate 1.15, pyarrow, pandas, xxhash, fsspec,
# msgpack, ninja, psutil, py-cpuinfo, einops) lack DeepSpeed, bitsandbytes, pydantic, TRL,
# datasets (and Ray, MLflow: not needed). What is carried to it (64 MiB at most), sizes as
# downloaded on 2026-12-07:
#   - this repository's tracked files (git ls-files: 3.7 MiB), run from source (PYTHONPATH),
#     not installed
#   - a folder of wheels and one source tarball, installed with pip --no-deps --no-index:
#       deepspeed-0.19.8.tar.gz (PyPI has no wheel: a source tarball, built on the host with
#         --no-build-isolation and DS_BUILD_OPS=0: pure Python, no compiler; raydpo hands
#         DeepSpeed a torch AdamW, so no op is ever JIT-built)       2,020,482 B (1.9 MiB)
#       hjson-3.1.0 (DeepSpeed's config parser)                         54,018 B
#       bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl      43,139,553 B (41.1 MiB)
#       trl-1.16.0-py3-none-any.whl                                    948,205 B (0.9 MiB)
#       datasets-5.2.0, dill-0.4.1, multiprocess-0.70.19 (TRL's; pyarrow, pandas, xxhash and
#         fsspec are on the host already)                              878,576 B (0.8 MiB)
#       pydantic-2.14.4, pydantic-core-2.50.5 (cp312: download it with the host's
#         --python-version), annotated-types, typing-inspection       2,788,012 B (2.7 MiB)
#   Made here with:
#       pip download --no-deps -d wheels deepspeed==0.19.8 hjson==3.1.0
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d wheels \
#           bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#           pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   In all 47.5 MiB of wheels + 3.7 MiB of repository = 51.2 MiB. Where the host lacks trl or
#   datasets (a host without pyarrow >= 24 and pandas: with them as wheels, 61 MiB, over the
#   budget), the TRL half is skipped with one line and the raydpo half still runs; where TRL
#   fails, its log's tail prints, raydpo's row still does, and the script exits 1.
#
# Usage (on the GPU host, from the repository root or anywhere):
#   jobs/gpu_check.sh WHEELS_DIR          # or WHEELS=WHEELS_DIR jobs/gpu_check.sh
#   SMOKE=1 jobs/gpu_check.sh             # any CPU machine with the dev environment: the same path
#                                         # (DeepSpeed bf16, NF4 with bf16 compute) on the tiny
#                                         # shape, 2 gloo processes, 2 steps at batch 1, max_length 128
# Env: OUT (work folder, default ./gpu_check_out; the model is built once and kept there), STEPS,
# BATCH (pairs per process), NPROC (processes; default: torch.cuda.device_count(), smoke 2),
# TFLOPS (the peak for MFU; default: the GPU's entry in raydpo.orchestration.estimate.GPUS),
# PYTHON (default python).
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
  sdists=("$WHEELS"/*.tar.gz)
  [ $(( ${#whls[@]} + ${#sdists[@]} )) -gt 0 ] || { say "no .whl or .tar.gz files in $WHEELS"; exit 2; }
  if [ ${#whls[@]} -gt 0 ]; then
    say "installing ${#whls[@]} wheels from $WHEELS (--no-deps --no-index)"
    "$PY" -m pip install -q --no-deps --no-index --no-compile "${whls[@]}"
  fi
  if [ ${#sdists[@]} -gt 0 ]; then  # deepspeed: built here against the host's torch, no ops compiled
    say "building ${#sdists[@]} source packages from $WHEELS (--no-build-isolation, DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation --no-compile "${sdists[@]}"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

prep=(--out "$OUT")
[ "$SMOKE" = 1 ] && prep+=(--smoke)
[ -n "${STEPS:-}" ] && prep+=(--steps "$STEPS")
[ -n "${BATCH:-}" ] && prep+=(--batch "$BATCH")
[ -n "${NPROC:-}" ] && prep+=(--nproc "$NPROC")
if [ "$SMOKE" != 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "no CUDA device seen by torch (SMOKE=1 runs the CPU smoke mode)"; exit 2; }
fi
# installed? (found, not imported: an import of these costs ~7 s on 2 cores, and the runs import them anyway)
has() { "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)' "$@"; }
has deepspeed bitsandbytes peft transformers pydantic \
  || { say "deepspeed/bitsandbytes/peft/transformers/pydantic missing: pass the wheels folder"; exit 2; }

t0=$(date +%s)
"$PY" -m raydpo.benchmarks.gpu_check prepare "${prep[@]}"
# the processes prepare chose (NPROC, or one per GPU): the config's, so both runs use the same
NPROC=$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["scaling"]["num_workers"])' \
  "$OUT/gpu_check.yaml")
# the config as `raydpo validate --estimate` reads it (a bad one fails here, before any training)
"$PY" -m raydpo.cli validate --config "$OUT/gpu_check.yaml" --estimate > "$OUT/estimate.txt" \
  || { cat "$OUT/estimate.txt"; say "raydpo validate --estimate rejected $OUT/gpu_check.yaml"; exit 1; }
say "prepare and validate --estimate: $(( $(date +%s) - t0 )) s ($NPROC processes; estimate: $OUT/estimate.txt)"

t1=$(date +%s)
if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m raydpo.train.standalone \
    --config "$OUT/gpu_check.yaml" --stage dpo > "$OUT/raydpo.log" 2> "$OUT/raydpo.err"; then
  tail -n 30 "$OUT/raydpo.err"; say "raydpo standalone run failed (log: $OUT/raydpo.err)"; exit 1
fi
say "raydpo standalone: $(( $(date +%s) - t1 )) s"

rm -f "$OUT/trl.json"
trl_rc=0
if has trl datasets; then
  t2=$(date +%s)
  launch=("$PY")  # one process: TRL as a one-GPU user runs it; more: DDP under torchrun, as raydpo
  [ "$NPROC" -gt 1 ] && launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
  if "${launch[@]}" -m raydpo.benchmarks.gpu_check trl --out "$OUT" > "$OUT/trl.log" 2>&1; then
    say "TRL: $(( $(date +%s) - t2 )) s"
  else
    trl_rc=1; tail -n 30 "$OUT/trl.log"; say "TRL run failed (log: $OUT/trl.log); raydpo's row follows"
  fi
else
  say "TRL skipped: trl or datasets is not installed here (see this script's header for the wheels)"
fi

rep=(--out "$OUT")
[ -n "${TFLOPS:-}" ] && rep+=(--tflops "$TFLOPS")
"$PY" -m raydpo.benchmarks.gpu_check report "${rep[@]}"
say "done in $(( $(date +%s) - t0 )) s; results: $OUT/report.json"
exit "$trl_rc"
