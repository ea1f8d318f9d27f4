"""Peak memory of DPO training steps, measured, against `raydpo.orchestration.estimate`.

    python -m raydpo.benchmarks.memory [--shape hidden,layers,heads,intermediate,vocab] [--batch B]
        [--max-length L] [--quant none|4bit|8bit] [--checkpointing on|off]
        [--head fused|completion-only|both] [--trl] [--json]

Each row runs in a fresh process (so each high-water mark is its own): a random-init Llama of the
shape is saved once, then loaded the way training loads it (`raydpo.models.factory.load_model`: bitsandbytes
on load, LoRA r8 on q/v), wrapped by the loop's DeepSpeed engine (`raydpo.train.engine.build_engine`,
one gloo rank, ZeRO-2, fp32 on CPU) and trained for `STEPS` DPO steps (`dpo_forward`, backward,
step) on pairs at the estimate's worst case (a 1-token prompt, two responses of ``L - 1`` tokens),
collated as the loop collates them (shared prefix, padding-free, completion-only logits,
precomputed reference log-probs), the LM head fused (``--head``: fused, the plain completion-only
head, or a row of each). `run_row(..., loop=True)` runs the steps through the training
loop itself instead (`_loop_steps`: `run_stage`, real reference log-probs, so step 0 is ln 2); the
Llama-2-7B layer test (``tests/integration/test_7b_shape.py``) measures that way.

``--trl`` adds TRL 1.16's ``DPOTrainer`` at the same shape, on the same pairs (`_raw`: TRL gets
their ids, `raydpo.benchmarks.trl_peer.run_trl`), batch, max_length and LoRA (r8 q/v, dropout 0.05:
TRL's ``disable_dropout`` off), fp32, its reference log-probs precomputed (TRL's fastest settings),
gradient checkpointing as the row says; measured the same way (`measure_trl`: a fresh process,
imports and a warm-up run of TRL on a minute model first). TRL pads chosen and rejected rows to
the longest (``tokens`` is then ``2·B·L``) and scores them with its own fused LM head.

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
TRL_WARMUP_SHAPE = (64, 1, 4, 176, 2048)  # TRL needs a tokenizer beside the model: the tiny one's 2,048 ids
HEADS = {"fused": (True,), "completion-only": (False,), "both": (True, False)}
ARMS = {True: "raydpo, fused head", False: "raydpo, completion-only head", "trl": "TRL 1.16 DPOTrainer"}


def row_config(shape, batch: int, max_length: int, quant: str, checkpointing: bool, use_gpu: bool = False,
               fused: bool = True) -> Config:
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
        "scaling.num_workers": 1, "scaling.use_gpu": use_gpu, "deepspeed.stage": 2, "dpo.fused_lm_head": fused,
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
    log-probs of the pairs computed first (`raydpo.train.ref_scoring.add_reference`, the runner's
    reference pass: adapter disabled, so the step-0 loss is ln 2), the loop's engine, step-0 sanity check, final save.
    Token ids stay within the folder's tokenizer. Returns the logged train losses, one per step."""
    import torch

    from raydpo.models.factory import load_model
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.loop import Hooks, run_stage
    from raydpo.train.ref_scoring import add_reference

    tok = load_tokenizer(folder)
    c = c.with_overrides({"dpo.max_steps": STEPS, "dpo.log_every": 1, "dpo.eval_every": 10**6,
                          "dpo.save_every": 10**6, "generations.enabled": False})
    torch.manual_seed(0)
    model = load_model(c.model, c.quantization, c.lora, base_path=folder, device=env.device)
    raw = {**_raw(c, id_high=len(tok)), "row_id": list(range(c.dpo.per_device_batch_size))}
    add_reference(model, raw, tok.pad_token_id, c.dpo, env.device)
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
                     use_gpu, spec["fused"])
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
    steps(row_config(WARMUP_SHAPE, 1, 16, spec["quant"], spec["checkpointing"], use_gpu, spec["fused"]),
          spec["warmup_folder"])
    out = _peak_of(lambda: steps(cfg, spec["folder"]), use_gpu)
    dist.destroy_process_group()
    return out


def _peak_of(run, use_gpu: bool) -> dict:
    """``run()``'s peak bytes above what the process holds now (module docstring), its seconds and
    what it returned (the losses)."""
    import torch

    gc.collect()
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = _status("VmRSS")
    t0 = time.perf_counter()
    losses = run()
    peak = (torch.cuda.max_memory_allocated() if use_gpu else _status("VmHWM")) - base
    return {"peak_bytes": peak, "seconds": time.perf_counter() - t0, "losses": losses,
            "method": "cuda max_memory_allocated" if use_gpu else "VmHWM - VmRSS after imports"}


def measure_trl(spec: dict) -> dict:
    """The TRL arm in this process (the child; module docstring): TRL's imports and a warm-up run on
    a minute model, then `STEPS` steps of ``DPOTrainer`` on the row's pairs; peak bytes as
    `measure_one` measures them (model load, TRL's reference precompute and the adapter save included,
    as the raydpo row's model load and engine build are)."""
    import torch
    import trl  # noqa: F401  (its import, and the libraries it loads, belong to the baseline)

    from raydpo.benchmarks.trl_peer import run_trl

    if torch.cuda.is_available():
        raise RuntimeError("the TRL arm measures on CPU (fp32) only")
    torch.set_num_threads(int(os.environ.get("RAYDPO_BENCH_THREADS", os.cpu_count() or 1)))
    cfg = row_config(tuple(spec["shape"]), spec["batch"], spec["max_length"], spec["quant"], spec["checkpointing"])

    def train(c: Config, folder: str, out: str) -> list[float]:
        raw = _raw(c)
        pairs = [{k: raw[k][i].tolist() for k in raw} for i in range(c.dpo.per_device_batch_size)]
        r = run_trl(folder, pairs, fastest=True, steps=STEPS, batch_size=c.dpo.per_device_batch_size,
                    lr=c.dpo.lr, beta=c.dpo.beta, lora_r=c.lora.r, lora_alpha=c.lora.alpha,
                    lora_dropout=c.lora.dropout, target_modules=list(c.lora.target_modules),
                    max_length=c.data.max_length, log_every=1, seed=0, out_dir=out, disable_dropout=False,
                    quant=c.quantization.mode, gradient_checkpointing=c.model.gradient_checkpointing)
        if not r["rows_identical"]:
            raise RuntimeError("TRL did not train on exactly the row's pairs")
        return [x["loss"] for x in r["losses"]]

    with tempfile.TemporaryDirectory(prefix="raydpo-membench-trl-") as tmp:
        warm = row_config(TRL_WARMUP_SHAPE, 1, 16, spec["quant"], spec["checkpointing"])
        train(warm, spec["warmup_folder"], os.path.join(tmp, "warm"))
        return _peak_of(lambda: train(cfg, spec["folder"], os.path.join(tmp, "row")), use_gpu=False)


def _child(spec: dict, trl: bool = False) -> dict:
    """Measure ``spec`` in a fresh process (`measure_one`, or `measure_trl`)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    if trl:  # offline, no telemetry, no progress bars: set before the child imports huggingface_hub
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "raydpo.benchmarks.memory", "--trl-one" if trl else "--one",
                        json.dumps(spec)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_trl_row(shape, batch: int, max_length: int, quant: str, checkpointing: bool, folder: str,
                warmup_folder: str) -> dict:
    """The TRL arm's row (`measure_trl`): both folders need a tokenizer (``warmup_folder`` of
    `TRL_WARMUP_SHAPE`). No estimate: that is raydpo's."""
    spec = {"shape": list(shape), "batch": batch, "max_length": max_length, "quant": quant,
            "checkpointing": checkpointing, "folder": folder, "warmup_folder": warmup_folder}
    got = _child(spec, trl=True)
    return {"arm": ARMS["trl"], "shape": ",".join(map(str, shape)), "batch": batch, "max_length": max_length,
            "quant": quant, "checkpointing": "on" if checkpointing else "off", "tokens": 2 * batch * max_length,
            "estimate_mib": None, "measured_mib": round(got["peak_bytes"] / 2**20, 1), "error_pct": None,
            "seconds": round(got["seconds"], 1), "losses": got["losses"], "method": got["method"]}


def run_row(shape, batch: int, max_length: int, quant: str, checkpointing: bool, folder: str, warmup_folder: str,
            port: int, loop: bool = False, fused: bool = True) -> dict:
    """A row: the estimate here, the measurement in a fresh process. ``loop``: the steps run through
    the training loop (`_loop_steps`; both folders need a tokenizer), else the engine's calls alone.
    ``fused``: ``dpo.fused_lm_head``."""
    from raydpo.orchestration.estimate import GIB, error_pct, estimate

    spec = {"shape": list(shape), "batch": batch, "max_length": max_length, "quant": quant,
            "checkpointing": checkpointing, "folder": folder, "warmup_folder": warmup_folder, "port": port,
            "loop": loop, "fused": fused}
    got = _child(spec)
    use_gpu = got["method"].startswith("cuda")
    est = estimate(row_config(shape, batch, max_length, quant, checkpointing, use_gpu, fused))
    parts = dict(est.parts)
    if use_gpu:  # the CUDA context is outside the allocator's statistics
        from raydpo.orchestration.estimate import CUDA_CONTEXT_GIB

        parts["overhead"] -= CUDA_CONTEXT_GIB
    est_mib = sum(parts.values()) * GIB / 2**20
    meas_mib = got["peak_bytes"] / 2**20
    return {"arm": ARMS[fused], "shape": ",".join(map(str, shape)), "batch": batch, "max_length": max_length,
            "quant": quant,
            "checkpointing": "on" if checkpointing else "off", "tokens": est.tokens_per_micro_batch,
            "estimate_mib": round(est_mib, 1), "measured_mib": round(meas_mib, 1),
            "error_pct": round(error_pct(est_mib, meas_mib), 1),
            "parts_mib": {k: round(v * GIB / 2**20, 1) for k, v in parts.items()},
            "seconds": round(got["seconds"], 1), "losses": got["losses"], "method": got["method"]}


def format_rows(rows: list[dict]) -> str:
    out = ["| arm | shape (h,layers,heads,inter,vocab) | quant | checkpointing | batch | L | tokens | estimate MiB | "
           "measured MiB | error_pct |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = "—" if r["estimate_mib"] is None else f"{r['estimate_mib']:,.1f}"
        err = "—" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        out.append(f"| {r['arm']} | {r['shape']} | {r['quant']} | {r['checkpointing']} | {r['batch']} | "
                   f"{r['max_length']} | {r['tokens']} | {est} | {r['measured_mib']:,.1f} | {err} |")
    return "\n".join(out)


def _rows(a, p) -> list[tuple]:
    """``(shape, batch, L, quant, checkpointing, arm)`` per row the arguments ask for; ``arm``: a
    key of `ARMS` (the fused head or not, or TRL)."""
    L = a.max_length or DEFAULT_MAX_LENGTH
    arms = [*HEADS[a.head], *(["trl"] if a.trl else [])]
    if a.shape is None and a.batch is None and a.quant is None and a.checkpointing is None:
        return [(DEFAULT_SHAPE, b, L, q, c, arm) for q, c, b in DEFAULT_ROWS for arm in arms]
    shape = tuple(int(x) for x in a.shape.split(",")) if a.shape else DEFAULT_SHAPE
    if len(shape) != 5:
        p.error("--shape takes hidden,layers,heads,intermediate,vocab")
    return [(shape, a.batch or 2, L, a.quant or "none", (a.checkpointing or "off") == "on", arm) for arm in arms]


def _measure(rows: list[tuple], progress) -> list[dict]:
    """Every row, its model folders built first (with the tiny tokenizer beside them when TRL runs)."""
    trl = any(r[-1] == "trl" for r in rows)
    tok = Config() if trl else None
    out = []
    with tempfile.TemporaryDirectory(prefix="raydpo-membench-") as tmp:
        folders: dict[tuple, str] = {WARMUP_SHAPE: os.path.join(tmp, "warmup")}
        _build_folder(row_config(WARMUP_SHAPE, 1, 16, "none", False), folders[WARMUP_SHAPE])
        for i, (shape, b, L, q, c, arm) in enumerate(rows):
            for sh in (shape, TRL_WARMUP_SHAPE) if arm == "trl" else (shape,):
                if sh not in folders:
                    folders[sh] = os.path.join(tmp, f"m{len(folders)}")
                    _build_folder(row_config(sh, b, L, q, c), folders[sh], tokenizer_from=tok)
            if arm == "trl":
                r = run_trl_row(shape, b, L, q, c, folders[shape], folders[TRL_WARMUP_SHAPE])
            else:
                r = run_row(shape, b, L, q, c, folders[shape], folders[WARMUP_SHAPE], 29500 + os.getpid() % 1000 + i,
                            fused=arm)
            out.append(r)
            progress(f"row {i + 1}/{len(rows)}: {json.dumps(r)}")
    return out


def versus_trl(rows: list[dict]) -> list[str]:
    """One line per raydpo row that has a TRL row of the same shape, batch, length and settings:
    raydpo's measured peak against TRL's."""
    def key(r):
        return r["shape"], r["batch"], r["max_length"], r["quant"], r["checkpointing"]

    trl = {key(r): r for r in rows if r["arm"] == ARMS["trl"]}
    return [f"{r['arm']}: {r['measured_mib']:,.1f} MiB = {r['measured_mib'] / trl[key(r)]['measured_mib']:.2f}x "
            f"TRL's {trl[key(r)]['measured_mib']:,.1f} MiB ({r['shape']}, batch {r['batch']}, L {r['max_length']})"
            for r in rows if r["arm"] != ARMS["trl"] and key(r) in trl]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raydpo.benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--shape", help="hidden,layers,heads,intermediate,vocab (default: the built-in rows)")
    p.add_argument("--batch", type=int, help="pairs per micro-batch")
    p.add_argument("--max-length", type=int, help=f"data.max_length (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"])
    p.add_argument("--checkpointing", choices=["on", "off"])
    p.add_argument("--head", choices=list(HEADS), default="fused",
                   help="dpo.fused_lm_head on, off (the completion-only head), or a row of each")
    p.add_argument("--trl", action="store_true", help="and TRL 1.16's DPOTrainer at each shape (CPU)")
    p.add_argument("--json", action="store_true", help="one JSON line with every row")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    p.add_argument("--trl-one", help=argparse.SUPPRESS)  # internal: TRL's row in this process
    a = p.parse_args(argv)
    if a.one or a.trl_one:
        print(json.dumps(measure_one(json.loads(a.one)) if a.one else measure_trl(json.loads(a.trl_one))), flush=True)
        return 0
    out_file = sys.stdout
    if a.json:  # stdout carries the one JSON line only, whatever the libraries print
        from raydpo.cli import _stdout_for_json

        out_file = _stdout_for_json()
    out = _measure(_rows(a, p), (lambda line: None) if a.json else (lambda line: print(line, file=sys.stderr,
                                                                                        flush=True)))
    if a.json:
        print(json.dumps({"rows": out, "method": out[0]["method"] if out else None}), file=out_file, flush=True)
    else:
        print(f"peak memory per DPO step sequence ({STEPS} steps), estimate vs measured ({out[0]['method']}):")
        print(format_rows(out))
        print("\n".join(versus_trl(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
