"""The one-shot GPU check's steps (driven by ``jobs/gpu_check.sh``): a random-init model of
Llama-2-7B's shape, raydpo's standalone loop and TRL's ``DPOTrainer`` on the same tokens, and
what each measured next to ``raydpo.orchestration.estimate``.

    python -m raydpo.benchmarks.gpu_check prepare --out DIR [--smoke] [--steps N] [--batch B]
    torchrun --standalone --nproc_per_node 1 -m raydpo.train.standalone --config DIR/gpu_check.yaml \
        --stage dpo > DIR/raydpo.log
    python -m raydpo.benchmarks.gpu_check trl --out DIR        # needs trl and datasets
    python -m raydpo.benchmarks.gpu_check report --out DIR [--tflops X]

``prepare`` writes into DIR: ``model/`` (Llama-2-7B's config, every layer, random-init on the GPU
in bf16, with the tiny local tokenizer: ids stay within its 2,048, the vocabulary stays 32,000;
``--smoke``: the tiny shape in fp32 on the CPU), ``rows.jsonl`` (stack-exchange rows whose
answers are long enough that both responses are cut to ``max_length``: the estimate's worst case
but for the few prompt tokens), ``gpu_check.yaml`` (the standalone run's config: NF4, LoRA r8
a16 on q/v, dropout 0 as TRL runs it, gradient checkpointing, max_length 1024,
``deepspeed.enabled: false``; its tokens/s and step time come from the loop's own metrics) and
``pairs.json`` (the very token ids the standalone run trains on, through the runner's own row
reading and `raydpo.data.tokenize.tokenize_dpo`, for `raydpo.benchmarks.trl_peer`).

``report`` reads ``raydpo.log`` (the standalone run's metric lines) and ``trl.json`` and prints one
line per system: tokens/s (steady state, step 1 excluded; a pair counts its prompt once per
response, as TRL feeds it: `raydpo.data.collate.pair_tokens`), pairs/s, seconds per step, MFU, peak memory and
``error_pct = 100·(estimate - measured)/measured`` (raydpo's row: the estimate models raydpo's
step, not TRL's padded bf16-autocast one). MFU is model FLOPs utilisation with the one
FLOPs formula `raydpo.orchestration.estimate.step_flops` of this config, for both systems (the same pairs per
step: the useful work, whatever each computes to do it), over the GPU's dense bf16 peak
(`raydpo.orchestration.estimate.GPUS`, or ``--tflops``). Peak memory: ``torch.cuda.max_memory_allocated`` of the
training steps (both reset it after model load and reference pass), against the estimate less the CUDA context
(outside the allocator). On the CPU (``--smoke``) there is no allocator statistic: peak memory
and error_pct print as n/a.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

GPU_STEPS, GPU_BATCH = 6, 4
SMOKE_STEPS, SMOKE_BATCH = 2, 1
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
SMOKE_MAX_LENGTH = 128
LLAMA_2_7B = "meta-llama/Llama-2-7b-hf"
RESULT_PREFIX = "[gpu_check] "


def check_config(model_dir: str, out: Path, *, smoke: bool, steps: int, batch: int, max_length: int):
    from raydpo.config import Config

    gpu = not smoke
    over = {
        "model.name_or_path": model_dir, "model.dtype": "bfloat16" if gpu else "float32",
        "model.gradient_checkpointing": True,
        "quantization.mode": "4bit", "quantization.quant_type": "nf4", "quantization.double_quant": False,
        "quantization.compute_dtype": "bfloat16" if gpu else "float32",
        "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "lora.target_modules": ["q_proj", "v_proj"],
        "deepspeed.enabled": False, "scaling.num_workers": 1, "scaling.use_gpu": gpu,
        "data.source": str(out / "rows.jsonl"), "data.format": "stack_exchange", "data.eval_fraction": 0.001,
        "data.max_length": max_length, "data.max_prompt_length": min(MAX_PROMPT_LENGTH, max_length // 2),
        "dpo.max_steps": steps, "dpo.per_device_batch_size": batch, "dpo.gradient_accumulation_steps": 1,
        "dpo.log_every": 1, "dpo.eval_every": 10**6, "dpo.save_every": 10**6, "dpo.eval_max_batches": 1,
        "generations.enabled": False, "run.name": "gpu-check", "run.storage_path": str(out / "runs"),
    }
    return Config().with_overrides(over)


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
    """The model folder: Llama-2-7B's shape (GPU, bf16) or the tiny one (CPU, fp32), random-init,
    with the tiny local tokenizer."""
    import torch

    from raydpo.config import Config
    from raydpo.models.tiny import random_llama
    from raydpo.orchestration.estimate import BUILTIN_SHAPES
    from raydpo.models.factory import resolve_model_path
    from raydpo.data.tokenizer import load_tokenizer

    tiny = Config().model
    tok = load_tokenizer(resolve_model_path(tiny))
    if smoke:
        t = tiny.tiny
        shape = dict(hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                     num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                     intermediate_size=t.intermediate_size, vocab_size=len(tok))
        device, dtype = "cpu", torch.float32
    else:
        s = BUILTIN_SHAPES[LLAMA_2_7B]
        shape = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                     num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab)
        device, dtype = "cuda", torch.bfloat16
    model = random_llama(0, dtype, device, **shape, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    del model


def prepare(out: Path, smoke: bool, steps: int, batch: int) -> None:
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.standalone import _rows

    out.mkdir(parents=True, exist_ok=True)
    L = SMOKE_MAX_LENGTH if smoke else MAX_LENGTH
    cfg = check_config(str(out / "model"), out, smoke=smoke, steps=steps, batch=batch, max_length=L)
    (out / "gpu_check.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if not (out / "model" / "config.json").exists():
        _build_model(out, smoke)
    n = steps * batch + 4  # every training pair once (TRL precomputes the reference of all of them)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _long_rows(n, chars=8 * L)))
    # the pairs the standalone run trains on: its own row reading, split and tokenization
    tok = load_tokenizer(str(out / "model"))
    rows = [r for r in _rows(cfg, "dpo", str(out / "model")) if not r["is_eval"]]
    ids = tokenize_dpo(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                       cfg.data.max_length, cfg.data.max_prompt_length, [r["templated"] for r in rows])
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    pairs = [dict(zip(keys, t)) for t in zip(*(ids[k] for k in keys))]
    (out / "pairs.json").write_text(json.dumps(pairs))
    lp = sorted({len(p["prompt_input_ids"]) for p in pairs})
    print(f"{RESULT_PREFIX}prepared {out}: {len(pairs)} training pairs, prompt tokens {lp[0]}-{lp[-1]}, "
          f"max_length {L}, {'smoke (CPU, tiny shape)' if smoke else 'Llama-2-7B shape (GPU, bf16)'}", flush=True)


def run_trl_peer(out: Path) -> dict:
    """TRL's ``DPOTrainer`` (`raydpo.benchmarks.trl_peer`) on ``pairs.json`` with the standalone
    run's settings: its device, NF4, bf16 on the GPU, gradient checkpointing, the precomputed
    reference, LoRA r/alpha/targets, lr, beta, batch, steps; TRL disables dropout (lora.dropout is
    0 on both sides). Writes ``trl.json``."""
    from raydpo.benchmarks.trl_peer import run_trl
    from raydpo.config import load_config

    cfg = load_config(out / "gpu_check.yaml")
    gpu, d, lo = cfg.scaling.use_gpu, cfg.dpo, cfg.lora
    res = run_trl(cfg.model.name_or_path, json.loads((out / "pairs.json").read_text()), fastest=True,
                  steps=d.max_steps, batch_size=d.per_device_batch_size, lr=d.lr, beta=d.beta, lora_r=lo.r,
                  lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                  max_length=cfg.data.max_length, log_every=1, seed=d.seed, out_dir=str(out / "trl"),
                  device="cuda" if gpu else "cpu", quant=cfg.quantization.mode, bf16=gpu,
                  gradient_checkpointing=cfg.model.gradient_checkpointing)
    (out / "trl.json").write_text(json.dumps(res, indent=2))
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


def report(out: Path, tflops: float | None) -> list[dict]:
    from raydpo.benchmarks.peer import steady_state
    from raydpo.config import load_config
    from raydpo.orchestration.estimate import CUDA_CONTEXT_GIB, error_pct, estimate, model_shape, step_flops

    cfg = load_config(out / "gpu_check.yaml")
    shape, _ = model_shape(cfg)
    flops = step_flops(cfg, shape)
    est = estimate(cfg)
    est_gib = est.peak_memory_gib - (CUDA_CONTEXT_GIB if cfg.scaling.use_gpu else 0.0)
    rate, rate_src = _peak_tflops(tflops)
    rows = []

    pairs = json.loads((out / "pairs.json").read_text())
    want = sum(2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"])
               for p in pairs) / len(pairs)
    hist = [json.loads(x) for x in (out / "raydpo.log").read_text().splitlines() if x.startswith("{")]
    ss = steady_state(hist)
    later = [h["train/step_time_s"] for h in hist if h["step"] > 1]
    peak = max((h.get("train/peak_memory_gb") for h in hist if "train/peak_memory_gb" in h), default=None)
    rows.append({"system": "raydpo standalone (plain torch, no DeepSpeed)", "tokens_per_s": ss["tokens_per_s"],
                 "pairs_per_s": ss["pairs_per_s"],
                 # the loop's own count of the tokens it trained on, per pair, against the prepared ids'
                 "same_tokens": abs(ss["input_tokens_per_pair"] - want) <= 0.01 * want,
                 "step_s": sum(later) / len(later), "peak_gib": peak,
                 "losses": [h["train/loss"] for h in hist if "train/loss" in h]})
    trl_file = out / "trl.json"
    if trl_file.exists():
        t = json.loads(trl_file.read_text())
        w = t["window"]
        rows.append({"system": f"TRL {t['trl_version']} DPOTrainer (precompute_ref_log_probs)",
                     "tokens_per_s": t["tokens_per_s"], "pairs_per_s": t["pairs_per_s"],
                     "same_tokens": t["rows_identical"],
                     "step_s": w["seconds"] / max(1, w["last_step"] - w["first_step"]),
                     "peak_gib": t.get("cuda_peak_gib"), "losses": [x["loss"] for x in t["losses"]],
                     # the estimate models raydpo's step (layout, logits, precision), not TRL's
                     "estimated": False})
    for r in rows:
        r["mfu"] = flops / r["step_s"] / (rate * 1e12) if rate else None
        r["estimate_gib"] = est_gib
        r["error_pct"] = error_pct(est_gib, r["peak_gib"]) if r["peak_gib"] and r.get("estimated", True) else None
        mfu = f"{100 * r['mfu']:.3g}%" if r["mfu"] is not None else f"n/a ({rate_src})"
        mem = (f"{r['peak_gib']:.2f} GiB (torch.cuda.max_memory_allocated)" if r["peak_gib"] else
               "n/a (no CUDA allocator)")
        err = (f"{r['error_pct']:+.1f}" if r["error_pct"] is not None
               else "n/a" if r.get("estimated", True) else "n/a (the estimate is of raydpo's step)")
        print(f"{RESULT_PREFIX}{r['system']}: tokens/s {r['tokens_per_s']:.1f} (pairs/s {r['pairs_per_s']:.3g}, "
              f"fed the prepared ids: {'yes' if r['same_tokens'] else 'NO'}), step {r['step_s']:.3f} s, MFU {mfu}, "
              f"peak memory {mem}, estimate {est_gib:.3f} GiB, error_pct {err}", flush=True)
    print(f"{RESULT_PREFIX}FLOPs per step (raydpo.orchestration.estimate.step_flops): {flops:.4e}; peak rate: "
          f"{f'{rate:g} TFLOP/s' if rate else 'n/a'} ({rate_src}); shape hidden {shape.hidden}, layers {shape.layers}, "
          f"vocab {shape.vocab}; batch {cfg.dpo.per_device_batch_size}, max_length {cfg.data.max_length}", flush=True)
    (out / "report.json").write_text(json.dumps({"rows": rows, "flops_per_step": flops, "tflops": rate}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raydpo.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("prepare")
    a1.add_argument("--out", required=True)
    a1.add_argument("--smoke", action="store_true", help="tiny shape, fp32, CPU, 2 steps at batch 1")
    a1.add_argument("--steps", type=int)
    a1.add_argument("--batch", type=int)
    sub.add_parser("trl").add_argument("--out", required=True)
    a2 = sub.add_parser("report")
    a2.add_argument("--out", required=True)
    a2.add_argument("--tflops", type=float, help="peak dense bf16 TFLOP/s (default: the GPU's datasheet entry)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.cmd == "prepare":
        steps = a.steps or (SMOKE_STEPS if a.smoke else GPU_STEPS)
        if steps < 2:
            p.error("--steps must be >= 2 (step 1 is warm-up, the timed window starts after it)")
        prepare(out, a.smoke, steps, a.batch or (SMOKE_BATCH if a.smoke else GPU_BATCH))
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


if __name__ == "__main__":
    sys.exit(main())
