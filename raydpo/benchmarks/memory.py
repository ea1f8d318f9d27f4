"""Peak memory of DPO training steps, measured, against `raydpo.orchestration.estimate`.

    python -m raydpo.benchmarks.memory [--shape hidden,layers,heads,intermediate,vocab] [--batch B]
        [--max-length L] [--quant none|4bit|8bit] [--checkpointing on|off] [--json]

Each row runs in a fresh process (so each high-water mark is its own): a random-init Llama of the
shape is saved once, then loaded the way training loads it (`raydpo.models.factory.load_model`: bitsandbytes
on load, LoRA r8 on q/v), wrapped by the loop's DeepSpeed engine (`raydpo.train.engine.build_engine`,
one gloo rank, ZeRO-2, fp32 on CPU) and trained for `STEPS` DPO steps (`dpo_forward`, backward,
step) on pairs at the estimate's worst case (a 1-token prompt, two responses of ``L - 1`` tokens),
collated as the loop collates them (shared prefix, padding-free, completion-only logits,
precomputed reference log-probs). `run_row(..., loop=True)` runs the steps through the training
loop itself instead (`_loop_steps`: `run_stage`, real reference log-probs, so step 0 is ln 2); the
Llama-2-7B layer test (``tests/integration/test_7b_shape.py``) measures that way.

How it measures. CPU: the resident-set high-water mark, ``VmHWM`` of ``/proc/self/status``, reset
(``echo 5 > /proc/self/clear_refs``) after the imports and the gloo group, and taken relative to
``VmRSS`` at that moment: the Python, torch and DeepSpeed baseline is excluded, as the estimate's
CPU overhead (0) says. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors
leave the resident set at once (glibc's adaptive threshold would otherwise keep freed blocks in
the heap), which makes RSS track live tensors as a GPU allocator's statistics do. GPU (when
CUDA is there): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, plus the
estimate's CUDA context is left out of the comparison (it is outside the allocator).

``error_pct = 100 · (estimate - measured) / measured`` of the total peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from raydpo.config import Config

STEPS = 2
DEFAULT_SHAPE = (512, 4, 8, 1376, 8192)
# (quant, checkpointing, batch): 4-bit and not, checkpointing on and off, two batch sizes
DEFAULT_ROWS = [("none", False, 2), ("none", False, 4), ("none", True, 4), ("4bit", False, 2), ("4bit", True, 4)]
DEFAULT_MAX_LENGTH = 256
WARMUP_SHAPE = (64, 1, 4, 176, 300)


def row_config(shape, batch: int, max_length: int, quant: str, checkpointing: bool, use_gpu: bool = False) -> Config:
    h, layers, heads, inter, vocab = shape
    over = {
        "model.tiny.hidden_size": h, "model.tiny.num_hidden_layers": layers, "model.tiny.num_attention_heads": heads,
        "model.tiny.num_key_value_heads": heads, "model.tiny.intermediate_size": inter,
        "model.tiny.vocab_size": vocab, "model.tiny.max_position_embeddings": max(2048, 2 * max_length),
        "model.gradient_checkpointing": checkpointing, "quantization.mode": quant,
        "quantization.compute_dtype": "bfloat16" if use_gpu else "float32",
        "model.dtype": "bfloat16" if use_gpu else "float32",
        "data.max_length": max_length, "data.max_prompt_length": max_length // 2,
        "dpo.per_device_batch_size": batch, "dpo.gradient_accumulation_steps": 1,
        "scaling.num_workers": 1, "scaling.use_gpu": use_gpu, "deepspeed.stage": 2,
    }
    return Config().with_overrides(over)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _build_folder(cfg: Config, out: str, tokenizer_from: Config | None = None) -> None:
    """A random-init Llama of ``cfg.model.tiny``'s shape (seeded) saved to ``out``; with
    ``tokenizer_from``, that config's tiny tokenizer beside it (the loop's checkpoint saves one)."""
    from raydpo.models.tiny import random_llama

    t = cfg.model.tiny
    model = random_llama(0, vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(out)
    config = model.config
    if tokenizer_from is not None:
        from raydpo.models.factory import resolve_model_path
        from raydpo.data.tokenizer import load_tokenizer

        tok = load_tokenizer(resolve_model_path(tokenizer_from.model))
        if tok.pad_token_id != config.pad_token_id or len(tok) > t.vocab_size:
            raise ValueError(f"the tiny tokenizer ({len(tok)} ids, pad {tok.pad_token_id}) does not fit the shape "
                             f"(vocab {t.vocab_size}, pad {config.pad_token_id})")
        tok.save_pretrained(out)


def _raw(cfg: Config, id_high: int | None = None) -> dict:
    """B pairs at the estimate's worst case: a 1-token prompt, responses of L - 1 tokens; ids drawn
    from ``[4, id_high)`` (default: the model's vocab)."""
    import numpy as np

    rng = np.random.default_rng(0)
    B, L = cfg.dpo.per_device_batch_size, cfg.data.max_length
    high = id_high or cfg.model.tiny.vocab_size

    def col(n):
        return [rng.integers(4, high, n, dtype=np.int64) for _ in range(B)]

    return {"prompt_input_ids": col(1), "chosen_input_ids": col(L - 1), "rejected_input_ids": col(L - 1)}


def _collate(cfg: Config, raw: dict, pad_id: int = 3):
    import numpy as np

    from raydpo.data.collate import collate_dpo, ragged

    B = len(raw["prompt_input_ids"])
    cols = {k: ragged(v) for k, v in raw.items() if k.endswith("_input_ids")}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        cols[k] = np.asarray(raw.get(k, np.zeros(B)), np.float32)
    return collate_dpo(cols, pad_id, share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)


def _batch(cfg: Config, pad_id: int = 3):
    """`_raw`'s pairs collated as the loop collates them, reference log-probs 0."""
    return _collate(cfg, _raw(cfg), pad_id)


def _loop_steps(c: Config, folder: str, env) -> list[float]:
    """`STEPS` DPO steps through the training loop itself (`raydpo.train.loop.run_stage`, as the
    standalone runner calls it): the model loaded by `raydpo.models.factory.load_model`, the reference
    log-probs of the pairs computed first (`raydpo.train.standalone.add_reference`, adapter
    disabled, so the step-0 loss is ln 2), the loop's engine, step-0 sanity check, final save.
    Token ids stay within the folder's tokenizer. Returns the logged train losses, one per step."""
    import torch

    from raydpo.models.factory import load_model
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.loop import Hooks, run_stage
    from raydpo.train.standalone import add_reference

    tok = load_tokenizer(folder)
    c = c.with_overrides({"dpo.max_steps": STEPS, "dpo.log_every": 1, "dpo.eval_every": 10**6,
                          "dpo.save_every": 10**6, "generations.enabled": False})
    torch.manual_seed(0)
    model = load_model(c.model, c.quantization, c.lora, base_path=folder, device=env.device)
    raw = _raw(c, id_high=len(tok))
    add_reference(model, raw, tok.pad_token_id, c, env.device)
    batch = _collate(c, raw, tok.pad_token_id)
    logged: list[dict] = []

    def drop(metrics, ckpt_dir):  # the final checkpoint is written (part of the loop), then removed
        if ckpt_dir:
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)

    hooks = Hooks(train_batches=lambda skip: iter([batch] * (STEPS - skip)), eval_batches=lambda: iter(()),
                  report=drop, log=lambda m, step: logged.append(m), progress=lambda s: None,
                  faults="")  # none, whatever $RAYDPO_FAULTS says
    run_stage("dpo", c, model, tok, env, hooks)
    return [m["train/loss"] for m in logged]


def measure_one(spec: dict) -> dict:
    """One row in this process (the child): load, engine, `STEPS` DPO steps; peak bytes."""
    import torch
    import torch.distributed as dist

    from raydpo.train.deepspeed import comm_backend
    from raydpo.models.factory import load_model
    from raydpo.models.pairs import packed_attention
    from raydpo.train.engine import WorkerEnv, build_engine
    from raydpo.train.loop import dpo_forward

    use_gpu = torch.cuda.is_available()
    cfg = row_config(tuple(spec["shape"]), spec["batch"], spec["max_length"], spec["quant"], spec["checkpointing"],
                     use_gpu)
    torch.set_num_threads(int(os.environ.get("RAYDPO_BENCH_THREADS", os.cpu_count() or 1)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group(comm_backend(use_gpu), rank=0, world_size=1)
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    env = WorkerEnv(rank=0, world_size=1, device=device, use_gpu=use_gpu)

    def engine_steps(c: Config, folder: str) -> list[float]:
        batch = {k: v.to(device) for k, v in _batch(c).items()}
        torch.manual_seed(0)
        model = load_model(c.model, c.quantization, c.lora, base_path=folder, device=device)
        engine, _, _ = build_engine(model, c, c.dpo, env)
        engine.train()
        out = []
        for _ in range(STEPS):
            with packed_attention(engine, batch):  # as the loop: the backward recomputes checkpointed layers
                loss, _ = dpo_forward(engine, model, batch, c)
                engine.backward(loss)
            engine.step()
            out.append(float(loss))
        return out

    def steps(c: Config, folder: str) -> list[float]:
        return _loop_steps(c, folder, env) if spec.get("loop") else engine_steps(c, folder)

    # a warm-up on a minute model of the same settings: the lazy imports (peft, the Llama modules,
    # DeepSpeed, bitsandbytes kernels) and one-time set-ups belong to the baseline, not the row
    steps(row_config(WARMUP_SHAPE, 1, 16, spec["quant"], spec["checkpointing"], use_gpu), spec["warmup_folder"])
    gc.collect()
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = _status("VmRSS")
    t0 = time.perf_counter()
    losses = steps(cfg, spec["folder"])
    peak = (torch.cuda.max_memory_allocated() if use_gpu else _status("VmHWM")) - base
    dist.destroy_process_group()
    return {"peak_bytes": peak, "seconds": time.perf_counter() - t0, "losses": losses,
            "method": "cuda max_memory_allocated" if use_gpu else "VmHWM - VmRSS after imports"}


def run_row(shape, batch: int, max_length: int, quant: str, checkpointing: bool, folder: str, warmup_folder: str,
            port: int, loop: bool = False) -> dict:
    """A row: the estimate here, the measurement in a fresh process. ``loop``: the steps run through
    the training loop (`_loop_steps`; both folders need a tokenizer), else the engine's calls alone."""
    from raydpo.orchestration.estimate import GIB, error_pct, estimate

    spec = {"shape": list(shape), "batch": batch, "max_length": max_length, "quant": quant,
            "checkpointing": checkpointing, "folder": folder, "warmup_folder": warmup_folder, "port": port,
            "loop": loop}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "raydpo.benchmarks.memory", "--one", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    use_gpu = got["method"].startswith("cuda")
    est = estimate(row_config(shape, batch, max_length, quant, checkpointing, use_gpu))
    parts = dict(est.parts)
    if use_gpu:  # the CUDA context is outside the allocator's statistics
        from raydpo.orchestration.estimate import CUDA_CONTEXT_GIB

        parts["overhead"] -= CUDA_CONTEXT_GIB
    est_mib = sum(parts.values()) * GIB / 2**20
    meas_mib = got["peak_bytes"] / 2**20
    return {"shape": ",".join(map(str, shape)), "batch": batch, "max_length": max_length, "quant": quant,
            "checkpointing": "on" if checkpointing else "off", "tokens": est.tokens_per_micro_batch,
            "estimate_mib": round(est_mib, 1), "measured_mib": round(meas_mib, 1),
            "error_pct": round(error_pct(est_mib, meas_mib), 1),
            "parts_mib": {k: round(v * GIB / 2**20, 1) for k, v in parts.items()},
            "seconds": round(got["seconds"], 1), "losses": got["losses"], "method": got["method"]}


def format_rows(rows: list[dict]) -> str:
    out = ["| shape (h,layers,heads,inter,vocab) | quant | checkpointing | batch | L | tokens | estimate MiB | "
           "measured MiB | error_pct |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['quant']} | {r['checkpointing']} | {r['batch']} | {r['max_length']} | "
                   f"{r['tokens']} | {r['estimate_mib']:,.1f} | {r['measured_mib']:,.1f} | {r['error_pct']:+.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raydpo.benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--shape", help="hidden,layers,heads,intermediate,vocab (default: the built-in rows)")
    p.add_argument("--batch", type=int, help="pairs per micro-batch")
    p.add_argument("--max-length", type=int, help=f"data.max_length (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"])
    p.add_argument("--checkpointing", choices=["on", "off"])
    p.add_argument("--json", action="store_true", help="one JSON line with every row")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(json.loads(a.one))), flush=True)
        return 0
    out_file = sys.stdout
    if a.json:  # stdout carries the one JSON line only, whatever the libraries print
        from raydpo.cli import _stdout_for_json

        out_file = _stdout_for_json()
    L = a.max_length or DEFAULT_MAX_LENGTH
    if a.shape is None and a.batch is None and a.quant is None and a.checkpointing is None:
        rows = [(DEFAULT_SHAPE, b, L, q, c) for q, c, b in DEFAULT_ROWS]
    else:
        shape = tuple(int(x) for x in a.shape.split(",")) if a.shape else DEFAULT_SHAPE
        if len(shape) != 5:
            p.error("--shape takes hidden,layers,heads,intermediate,vocab")
        rows = [(shape, a.batch or 2, L, a.quant or "none", (a.checkpointing or "off") == "on")]
    out = []
    with tempfile.TemporaryDirectory(prefix="raydpo-membench-") as tmp:
        folders: dict[tuple, str] = {WARMUP_SHAPE: os.path.join(tmp, "warmup")}
        _build_folder(row_config(WARMUP_SHAPE, 1, 16, "none", False), folders[WARMUP_SHAPE])
        for i, (shape, b, L_, q, c) in enumerate(rows):
            if shape not in folders:
                folders[shape] = os.path.join(tmp, f"m{len(folders)}")
                _build_folder(row_config(shape, b, L_, q, c), folders[shape])
            r = run_row(shape, b, L_, q, c, folders[shape], folders[WARMUP_SHAPE], 29500 + os.getpid() % 1000 + i)
            out.append(r)
            if not a.json:
                print(f"row {i + 1}/{len(rows)}: {json.dumps(r)}", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps({"rows": out, "method": out[0]["method"] if out else None}), file=out_file, flush=True)
    else:
        print(f"peak memory per DPO step sequence ({STEPS} steps), estimate vs measured ({out[0]['method']}):")
        print(format_rows(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
