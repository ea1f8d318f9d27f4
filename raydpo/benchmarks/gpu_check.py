"""The one-shot GPU check's steps (driven by ``jobs/gpu_check.sh``): a random-init model of
Llama-2-7B's shape trained a few DPO steps by raydpo's production path and by TRL's
``DPOTrainer`` on the same tokens, in the same precision and layout, and what each measured next
to ``raydpo.orchestration.estimate``.

    python -m raydpo.benchmarks.gpu_check prepare --out DIR [--smoke] [--steps N] [--batch B] [--nproc P]
    python -m raydpo.cli validate --config DIR/gpu_check.yaml --estimate        # the config, checked first
    torchrun --standalone --nproc_per_node P -m raydpo.train.standalone --config DIR/gpu_check.yaml \
        --stage dpo > DIR/raydpo.log
    [torchrun --standalone --nproc_per_node P] -m raydpo.benchmarks.gpu_check trl --out DIR   # trl, datasets
    python -m raydpo.benchmarks.gpu_check report --out DIR [--tflops X]

What raydpo runs is what a user of ``jobs/stack_llama_2_gpu.yaml`` runs: that file's model,
quantization, LoRA, DeepSpeed and DPO sections as they are (NF4 with bf16 compute, gradient
checkpointing, LoRA r8 a16 dropout 0.05 on q/v, DeepSpeed ZeRO-2 bf16 — the engine is the
recipe's, read from the file, not a copy), one process per GPU (NCCL between them, `comm_backend`),
through the torchrun runner (`raydpo.train.standalone`: the Ray workers' loop and engine without
Ray). Only what a few timed steps need differs: the model folder, the data, ``max_steps``, no
gradient accumulation (TRL's side runs none), no warm-up, no eval, no save before the end. TRL
trains the same model with the same NF4 config, bf16 (its autocast), the recipe's LoRA dropout,
the same per-process batch and process count (under torchrun when above 1: the same global batch).

``prepare`` writes into DIR: ``model/`` (Llama-2-7B's config, every layer, random-init on the GPU
in bf16, with the tiny local tokenizer: ids stay within its 2,048, the vocabulary stays 32,000;
``--smoke``: the tiny shape on the CPU), ``rows.jsonl`` (stack-exchange rows whose answers are long
enough that both responses are cut to ``max_length``: the estimate's worst case but for the few
prompt tokens), ``gpu_check.yaml`` (`check_config`) and ``pairs.json`` (the very token ids the
standalone run trains on, through the runner's own row reading and `raydpo.data.tokenize.tokenize_dpo`,
for `raydpo.benchmarks.trl_peer`). ``--smoke`` differs from the GPU run only in the device (CPU,
gloo), the shape and the sizes: DeepSpeed bf16 and NF4 with bf16 compute run on the CPU too.

``report`` reads ``raydpo.log`` (the standalone run's metric lines, rank 0's) and ``trl.json`` and
prints one line per system: tokens/s (steady state, step 1 excluded, every process's tokens; a
pair counts its prompt once per response, as TRL feeds it: `raydpo.data.collate.pair_tokens`),
pairs/s, seconds per step, MFU, peak memory and ``error_pct = 100·(estimate - measured)/measured``
(raydpo's row: the estimate models raydpo's step, not TRL's). MFU is model FLOPs utilisation of
one GPU with the one FLOPs formula `raydpo.orchestration.estimate.step_flops` of this config (one
process's step) for both systems (the same pairs per step and process: the useful work, whatever
each computes to do it), over the GPU's dense bf16 peak (`raydpo.orchestration.estimate.GPUS`, or
``--tflops``). Peak memory: rank 0's ``torch.cuda.max_memory_allocated`` of the training steps
(both reset it after model load and reference pass), against the estimate less the CUDA context
(outside the allocator). On the CPU (``--smoke``) there is no allocator statistic: peak memory and
error_pct print as n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from raydpo.config import Config

RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "stack_llama_2_gpu.yaml"
# what users train with, taken whole from the recipe (the training loop's sizes are the check's own)
RECIPE_SECTIONS = ("model", "quantization", "lora", "deepspeed", "dpo")
GPU_STEPS = 6
SMOKE_STEPS, SMOKE_BATCH, SMOKE_NPROC = 2, 1, 2  # two gloo ranks: the multi-process path, checked on a CPU
SMOKE_MAX_LENGTH = 128
LLAMA_2_7B = "meta-llama/Llama-2-7b-hf"
RESULT_PREFIX = "[gpu_check] "


def recipe_config() -> Config:
    from raydpo.config import load_config

    return load_config(RECIPE)


def check_config(model_dir: str, out: Path, *, smoke: bool, steps: int, batch: int, max_length: int,
                 nproc: int) -> Config:
    """The standalone run's config: `RECIPE_SECTIONS` of the recipe unchanged but for the loop's
    sizes, one worker per process (``scaling.num_workers``: what the estimate divides ZeRO's shards
    by), on the GPU unless ``smoke``."""
    recipe = recipe_config().to_dict()
    base = Config().to_dict()
    base.update({k: recipe[k] for k in RECIPE_SECTIONS})
    r = recipe["data"]
    over = {
        "model.name_or_path": model_dir, "scaling.num_workers": nproc, "scaling.use_gpu": not smoke,
        "data.source": str(out / "rows.jsonl"), "data.format": "stack_exchange", "data.eval_fraction": 0.001,
        "data.max_length": max_length, "data.max_prompt_length": min(r["max_prompt_length"], max_length // 2),
        "dpo.max_steps": steps, "dpo.per_device_batch_size": batch, "dpo.gradient_accumulation_steps": 1,
        "dpo.warmup_steps": 0, "dpo.log_every": 1, "dpo.eval_every": 10**6, "dpo.save_every": 10**6,
        "dpo.eval_max_batches": 1,
        "generations.enabled": False, "run.name": "gpu-check", "run.storage_path": str(out / "runs"),
    }
    return Config.from_dict(base).with_overrides(over)


def layout(cfg: Config) -> dict:
    """How the standalone run trains (rank 0's view, for the report): engine, precision,
    processes and their torch.distributed backend (`raydpo.train.deepspeed.comm_backend`, the
    runner's own choice)."""
    from raydpo.config import resolve_precision
    from raydpo.train.deepspeed import comm_backend

    ds, gpu = cfg.deepspeed, cfg.scaling.use_gpu
    engine = f"DeepSpeed ZeRO-{ds.stage} {resolve_precision(cfg, gpu)}" if ds.enabled else "plain torch"
    return {"engine": engine, "processes": cfg.scaling.num_workers, "backend": comm_backend(gpu),
            "per_process_batch": cfg.dpo.per_device_batch_size,
            "global_batch": cfg.dpo.per_device_batch_size * cfg.scaling.num_workers}


def _long_rows(n: int, chars: int, seed: int = 0) -> list[dict]:
    """Stack-exchange rows with a two-word question (a short prompt, near the estimate's 1-token
    worst case) and two answers of at least ``chars`` characters of sample text each."""
    from raydpo.data.sample import generate_rows

    base = generate_rows(n + 64, seed)
    words = " ".join(r["response_j"] + " " + r["response_k"] for r in base)
    while len(words) < 2 * chars:
        words += " " + words
    rows = []
    for i, r in enumerate(base[:n]):
        lo = (i * 997) % max(1, len(words) - 2 * chars)
        rows.append({"question": " ".join(r["question"].split()[:2]), "response_j": words[lo:lo + chars],
                     "response_k": words[lo + chars:lo + 2 * chars]})
    return rows


def _build_model(out: Path, smoke: bool) -> None:
    """The model folder: Llama-2-7B's shape (GPU) or the tiny one (CPU), random-init in bf16 (the
    recipe's ``model.dtype``), with the tiny local tokenizer."""
    import torch

    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.models.factory import resolve_model_path
    from raydpo.models.tiny import random_llama
    from raydpo.orchestration.estimate import BUILTIN_SHAPES

    tiny = Config().model
    tok = load_tokenizer(resolve_model_path(tiny))
    if smoke:
        t = tiny.tiny
        shape = dict(hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                     num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                     intermediate_size=t.intermediate_size, vocab_size=len(tok))
    else:
        s = BUILTIN_SHAPES[LLAMA_2_7B]
        shape = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                     num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab)
    model = random_llama(0, torch.bfloat16, "cpu" if smoke else "cuda", **shape, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    del model


def _training_pairs(cfg: Config, model_dir: str) -> list[dict]:
    """The pairs the standalone run trains on: its own row reading, split and tokenization."""
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.standalone import _rows

    tok = load_tokenizer(model_dir)
    rows = [r for r in _rows(cfg, "dpo", model_dir) if not r["is_eval"]]
    ids = tokenize_dpo(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                       cfg.data.max_length, cfg.data.max_prompt_length, [r["templated"] for r in rows])
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    return [dict(zip(keys, t)) for t in zip(*(ids[k] for k in keys))]


def prepare(out: Path, smoke: bool, steps: int, batch: int, nproc: int) -> Config:
    out.mkdir(parents=True, exist_ok=True)
    L = SMOKE_MAX_LENGTH if smoke else recipe_config().data.max_length
    model_dir = str(out / "model")
    cfg = check_config(model_dir, out, smoke=smoke, steps=steps, batch=batch, max_length=L, nproc=nproc)
    (out / "gpu_check.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if not (out / "model" / "config.json").exists():
        _build_model(out, smoke)
    # every training pair once, on every process (TRL precomputes the reference of all of them)
    n = steps * batch * nproc + 4
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _long_rows(n, chars=8 * L)))
    pairs = _training_pairs(cfg, model_dir)
    (out / "pairs.json").write_text(json.dumps(pairs))
    lp = sorted({len(p["prompt_input_ids"]) for p in pairs})
    lay = layout(cfg)
    print(f"{RESULT_PREFIX}prepared {out}: {len(pairs)} training pairs, prompt tokens {lp[0]}-{lp[-1]}, "
          f"max_length {L}, {'smoke (CPU, tiny shape)' if smoke else 'Llama-2-7B shape (GPU)'}; {lay['engine']}, "
          f"{lay['processes']} processes ({lay['backend']}), batch {lay['per_process_batch']} per process",
          flush=True)
    return cfg


def run_trl_peer(out: Path) -> dict:
    """TRL's ``DPOTrainer`` (`raydpo.benchmarks.trl_peer`) on ``pairs.json`` with the standalone
    run's settings: its device (this process's GPU under torchrun), NF4, bf16 where DeepSpeed
    trains in bf16, gradient checkpointing, the precomputed reference, LoRA r/alpha/dropout/targets
    (TRL's ``disable_dropout`` off: the recipe's dropout on both sides), lr, beta, per-process
    batch, steps. Every process trains; rank 0 writes ``trl.json``."""
    import torch
    import torch.distributed as dist

    from raydpo.benchmarks.trl_peer import run_trl
    from raydpo.config import load_config, resolve_precision

    cfg = load_config(out / "gpu_check.yaml")
    gpu, d, lo = cfg.scaling.use_gpu, cfg.dpo, cfg.lora
    bf16 = resolve_precision(cfg, gpu) == "bf16"  # DeepSpeed's precision: TRL's autocast and weights follow it
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if gpu:  # this process's GPU, as the standalone runner's `env_from_torch` picks it
        torch.cuda.set_device(local)
    res = run_trl(cfg.model.name_or_path, json.loads((out / "pairs.json").read_text()), fastest=True,
                  steps=d.max_steps, batch_size=d.per_device_batch_size, lr=d.lr, beta=d.beta, lora_r=lo.r,
                  lora_alpha=lo.alpha, lora_dropout=lo.dropout, disable_dropout=False,
                  target_modules=list(lo.target_modules), max_length=cfg.data.max_length, log_every=1, seed=d.seed,
                  out_dir=str(out / "trl"), device=f"cuda:{local}" if gpu else "cpu", quant=cfg.quantization.mode,
                  bf16=bf16, gradient_checkpointing=cfg.model.gradient_checkpointing)
    res.update(processes=world, bf16=bf16)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "trl.json").write_text(json.dumps(res, indent=2))
    if dist.is_initialized():  # accelerate's group, under torchrun
        dist.destroy_process_group()
    return res


def _peak_tflops(tflops: float | None) -> tuple[float | None, str]:
    """The GPU's dense bf16 peak: given, or the `raydpo.orchestration.estimate.GPUS` entry of this device."""
    if tflops is not None:
        return tflops, "--tflops"
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU"
    from raydpo.orchestration.estimate import EstimateError, find_gpu

    name = torch.cuda.get_device_name(0).replace("NVIDIA", "").strip()
    try:
        key, g = find_gpu(name)
        return g.tflops, key
    except EstimateError:
        return None, f"{name} is not in raydpo.orchestration.estimate.GPUS (pass --tflops)"


def _raydpo_row(out: Path, cfg: Config, want_tokens_per_pair: float) -> dict:
    """The standalone run's row from its metric lines (rank 0 prints them; tokens and pairs are
    every rank's, the peak is rank 0's)."""
    from raydpo.benchmarks.peer import steady_state

    hist = [json.loads(x) for x in (out / "raydpo.log").read_text().splitlines() if x.startswith("{")]
    ss = steady_state(hist)
    later = [h["train/step_time_s"] for h in hist if h["step"] > 1]
    peak = max((h.get("train/peak_memory_gb") for h in hist if "train/peak_memory_gb" in h), default=None)
    lay = layout(cfg)
    return {"system": f"raydpo standalone ({lay['engine']}, {lay['processes']} processes, {lay['backend']})",
            "tokens_per_s": ss["tokens_per_s"], "pairs_per_s": ss["pairs_per_s"],
            # the loop's own count of the tokens it trained on, per pair, against the prepared ids'
            "same_tokens": abs(ss["input_tokens_per_pair"] - want_tokens_per_pair) <= 0.01 * want_tokens_per_pair,
            "step_s": sum(later) / len(later), "peak_gib": peak, "processes": lay["processes"],
            "losses": [h["train/loss"] for h in hist if "train/loss" in h]}


def _trl_row(t: dict) -> dict:
    """TRL's row from ``trl.json`` (rank 0's file: tokens and pairs of every rank, rank 0's peak)."""
    w, n, precision = t["window"], t["processes"], "bf16" if t["bf16"] else "fp32"
    return {"system": f"TRL {t['trl_version']} DPOTrainer (precompute_ref_log_probs, {precision}, "
                      f"{n} processes{' DDP' if n > 1 else ''})",
            "tokens_per_s": t["tokens_per_s"], "pairs_per_s": t["pairs_per_s"], "same_tokens": t["rows_identical"],
            "step_s": w["seconds"] / max(1, w["last_step"] - w["first_step"]),
            "peak_gib": t.get("cuda_peak_gib"), "processes": n, "losses": [x["loss"] for x in t["losses"]],
            # the estimate models raydpo's step (layout, logits, precision), not TRL's
            "estimated": False}


def report(out: Path, tflops: float | None) -> list[dict]:
    from raydpo.config import load_config
    from raydpo.orchestration.estimate import CUDA_CONTEXT_GIB, error_pct, estimate, model_shape, step_flops

    cfg = load_config(out / "gpu_check.yaml")
    shape, _ = model_shape(cfg)
    flops = step_flops(cfg, shape)  # one process's step: MFU is per GPU
    est_gib = estimate(cfg).peak_memory_gib - (CUDA_CONTEXT_GIB if cfg.scaling.use_gpu else 0.0)
    rate, rate_src = _peak_tflops(tflops)
    pairs = json.loads((out / "pairs.json").read_text())
    want = sum(2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"])
               for p in pairs) / len(pairs)
    rows = [_raydpo_row(out, cfg, want)]
    if (out / "trl.json").exists():
        rows.append(_trl_row(json.loads((out / "trl.json").read_text())))
    for r in rows:
        r["mfu"] = flops / r["step_s"] / (rate * 1e12) if rate else None
        r["estimate_gib"] = est_gib
        r["error_pct"] = error_pct(est_gib, r["peak_gib"]) if r["peak_gib"] and r.get("estimated", True) else None
        print(_line(r, rate_src), flush=True)
    lay = layout(cfg)
    print(f"{RESULT_PREFIX}FLOPs per step and process (raydpo.orchestration.estimate.step_flops): {flops:.4e}; peak "
          f"rate: {f'{rate:g} TFLOP/s' if rate else 'n/a'} ({rate_src}); shape hidden {shape.hidden}, layers "
          f"{shape.layers}, vocab {shape.vocab}; batch {lay['per_process_batch']} per process x {lay['processes']} "
          f"processes = {lay['global_batch']}, max_length {cfg.data.max_length}", flush=True)
    (out / "report.json").write_text(json.dumps({"rows": rows, "flops_per_step": flops, "tflops": rate,
                                                 "layout": lay}, indent=2))
    return rows


def _line(r: dict, rate_src: str) -> str:
    mfu = f"{100 * r['mfu']:.3g}%" if r["mfu"] is not None else f"n/a ({rate_src})"
    mem = f"{r['peak_gib']:.2f} GiB (torch.cuda.max_memory_allocated)" if r["peak_gib"] else "n/a (no CUDA allocator)"
    err = (f"{r['error_pct']:+.1f}" if r["error_pct"] is not None
           else "n/a" if r.get("estimated", True) else "n/a (the estimate is of raydpo's step)")
    return (f"{RESULT_PREFIX}{r['system']}: tokens/s {r['tokens_per_s']:.1f} (pairs/s {r['pairs_per_s']:.3g}, "
            f"fed the prepared ids: {'yes' if r['same_tokens'] else 'NO'}), step {r['step_s']:.3f} s, MFU {mfu}, "
            f"peak memory {mem}, estimate {r['estimate_gib']:.3f} GiB, error_pct {err}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raydpo.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("prepare")
    a1.add_argument("--out", required=True)
    a1.add_argument("--smoke", action="store_true",
                    help=f"tiny shape, CPU, {SMOKE_STEPS} steps at batch {SMOKE_BATCH}, {SMOKE_NPROC} processes")
    a1.add_argument("--steps", type=int, help=f"default {GPU_STEPS}; smoke {SMOKE_STEPS}")
    a1.add_argument("--batch", type=int,
                    help=f"pairs per process and step (default: the recipe's; smoke {SMOKE_BATCH})")
    a1.add_argument("--nproc", type=int, help=f"processes (default: one per GPU torch sees; smoke {SMOKE_NPROC})")
    sub.add_parser("trl").add_argument("--out", required=True)
    a2 = sub.add_parser("report")
    a2.add_argument("--out", required=True)
    a2.add_argument("--tflops", type=float, help="peak dense bf16 TFLOP/s (default: the GPU's datasheet entry)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.cmd == "prepare":
        steps = a.steps or (SMOKE_STEPS if a.smoke else GPU_STEPS)
        batch = a.batch or (SMOKE_BATCH if a.smoke else recipe_config().dpo.per_device_batch_size)
        nproc = a.nproc or (SMOKE_NPROC if a.smoke else _gpus())
        if steps < 2:
            p.error("--steps must be >= 2 (step 1 is warm-up, the timed window starts after it)")
        if nproc < 1:
            p.error("no GPU seen by torch (--smoke runs on the CPU)")
        prepare(out, a.smoke, steps, batch, nproc)
    elif a.cmd == "trl":
        if not (out / "pairs.json").exists():
            p.error(f"{out} lacks pairs.json: run prepare first")
        run_trl_peer(out)
    else:
        missing = [f for f in ("gpu_check.yaml", "raydpo.log") if not (out / f).exists()]
        if missing:
            p.error(f"{out} lacks {', '.join(missing)}: run prepare and the standalone run first")
        report(out, a.tflops)
    return 0


def _gpus() -> int:
    """One process per GPU torch sees (``CUDA_VISIBLE_DEVICES`` respected, as torchrun's ranks see them)."""
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
