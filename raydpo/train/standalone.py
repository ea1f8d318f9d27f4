"""Run one stage's loop without Ray, under ``torchrun`` — how the GPU path (bf16, 4-bit on CUDA,
DeepSpeed over NCCL) is checked on machines that have no Ray:

    torchrun --nproc_per_node N -m raydpo.train.standalone --config F --stage dpo [--set k=v ...]

Data is read and tokenized in-process with the same format detection, row validation and
tokenization functions the Ray Data pipeline runs (sample or local json/jsonl files), sharded by
rank. No MLflow: the metrics (and the eval generations) are printed by rank 0. Checkpoints are
written under ``run.storage_path``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from functools import partial
from pathlib import Path

GENERATIONS_PREFIX = "[generations] "


def _rows(cfg, stage: str, tokenizer_path: str) -> list[dict]:
    """The stage's valid rows (``data.sft_source`` for SFT when set), in any data format, through
    the pipeline's own detection, validation and rendering."""
    from raydpo.config import BUILTIN_SOURCE
    from raydpo.data.rows import prepare_rows
    from raydpo.data.sample import sample_rows
    from raydpo.data.sources import resolve_format, stage_source

    d = cfg.data
    src = stage_source(d, stage)
    if src == BUILTIN_SOURCE:
        raw = sample_rows(d.sample_size, d.seed, "stack_exchange" if d.format == "auto" else d.format,
                          d.prompt_template)
    else:
        text = Path(src).read_text()
        raw = json.loads(text) if src.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    raw = raw[: d.max_rows]
    fmt, renderer = resolve_format(d, raw, src, tokenizer_path, cfg.model.revision)
    cols = prepare_rows(raw, d.max_chars, d.prompt_template, d.eval_fraction, fmt=fmt,
                        columns=dict(d.columns) or None, renderer=renderer)
    keys = ("prompt", "chosen", "rejected", "is_eval", "templated")
    return [dict(zip(keys, t)) for r, *t in zip(cols["reason"], *(cols[k] for k in keys)) if r == ""]


def add_reference(model, cols: dict[str, list], pad_token_id: int, cfg, device) -> None:
    """Reference log-prob sums of every pair in ``cols`` (adapter disabled, the training
    forward), added as ``ref_chosen_logps`` / ``ref_rejected_logps`` lists."""
    from raydpo.data.collate import collate_dpo, ragged
    from raydpo.models.pairs import reference_logps

    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    n, step = len(cols[keys[0]]), cfg.dpo.per_device_batch_size * 4
    cols["ref_chosen_logps"], cols["ref_rejected_logps"] = [], []
    for lo in range(0, n, step):
        b = collate_dpo({k: ragged(cols[k][lo:lo + step]) for k in keys}, pad_token_id,
                        share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)
        c, r = reference_logps(model, {k: v.to(device) for k, v in b.items()},
                               completion_only=cfg.dpo.completion_only_logits)
        cols["ref_chosen_logps"] += c.cpu().tolist()
        cols["ref_rejected_logps"] += r.cpu().tolist()


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from raydpo.config import load_config
    from raydpo.data.collate import collate_dpo, collate_sft, ragged
    from raydpo.data.order import epoch_order, epochs_needed, usable_rows
    from raydpo.data.tokenize import block_row_ids, pack_sft, tokenize_dpo
    from raydpo.train.generate import held_out_prompts
    from raydpo.data.order import rank_batches
    from raydpo.models.factory import load_model, resolve_model_path
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.deepspeed import comm_backend
    from raydpo.train.loop import Hooks, env_from_torch, run_stage

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--stage", choices=["sft", "dpo"], default="dpo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    dist.init_process_group(comm_backend(use_gpu))
    env = env_from_torch(use_gpu)

    path = resolve_model_path(cfg.model) if env.rank == 0 else None
    obj = [path]
    dist.broadcast_object_list(obj, src=0)  # rank 0 materializes the tiny model once
    path = obj[0]
    tok = load_tokenizer(path)
    rows = _rows(cfg, args.stage, path)
    stage_cfg = cfg.stage(args.stage)
    bs = stage_cfg.per_device_batch_size

    dpo_cols: list[dict] = []

    def columns(mine: list[dict]):
        if args.stage == "sft":
            blocks = pack_sft(tok, [r["prompt"] + r["chosen"] for r in mine], cfg.data.sft_block_size,
                              [r["templated"] for r in mine])
            return {"input_ids": blocks, "row_id": block_row_ids(blocks)}, collate_sft
        cols = tokenize_dpo(tok, [r["prompt"] for r in mine], [r["chosen"] for r in mine],
                            [r["rejected"] for r in mine], cfg.data.max_length, cfg.data.max_prompt_length,
                            [r["templated"] for r in mine])
        dpo_cols.append(cols)
        return cols, partial(collate_dpo, pad_token_id=tok.pad_token_id, share_prefix=cfg.dpo.share_prefix,
                             pack=cfg.dpo.padding_free)

    def pick(cols, idx):
        return {k: ragged(v[i] for i in idx) for k, v in cols.items()}

    # training: every rank holds all train rows and walks the same stream (raydpo.data.order),
    # keeping its slice of each global micro-batch, as the Ray workers do
    train_cols, collate = columns([r for r in rows if not r["is_eval"]])
    n_train = len(train_cols["row_id"])

    def train_batches(skip: int):
        g = bs * env.world_size
        micro = stage_cfg.max_steps * stage_cfg.gradient_accumulation_steps
        stream = np.concatenate([epoch_order(train_cols["row_id"], cfg.data.seed, e)[:usable_rows(n_train, g)]
                                 for e in range(epochs_needed(n_train, g, micro))])

        def numpy_batches(n):
            for lo in range(0, len(stream) - n + 1, n):
                yield pick(train_cols, stream[lo:lo + n])
        return rank_batches(numpy_batches, bs, env.world_size, env.rank, collate, skip)

    # evaluation: each rank its share, the same number of rows on every rank (the metric
    # all-reduce is collective), the last partial batch kept
    eval_cols, _ = columns([r for r in rows if r["is_eval"]][env.rank::env.world_size])
    n = torch.tensor([len(eval_cols["row_id"])], device=env.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n_eval = int(n.item())

    def eval_batches():
        for lo in range(0, n_eval, bs):
            yield collate(pick(eval_cols, range(lo, min(lo + bs, n_eval))))

    torch.manual_seed(stage_cfg.seed)  # the fresh adapter's init: the same on every rank and every run
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path, device=env.device)
    if args.stage == "dpo" and cfg.dpo.precomputed_reference:  # none for a reference-free loss
        # the reference pass, in-process: each rank scores its own rows once, before training
        for cols in dpo_cols:
            add_reference(model, cols, tok.pad_token_id, cfg, env.device)
    if env.use_gpu:  # train/peak_memory_gb: the training's peak, as on a Ray worker (no reference pass there)
        torch.cuda.reset_peak_memory_stats(env.device)
    out_dir = Path(cfg.run.storage_path) / f"{cfg.run.name}-{args.stage}-standalone"

    def report(metrics, ckpt_dir):
        if ckpt_dir:
            dest = out_dir / f"step_{int(metrics['step'])}"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(ckpt_dir, dest, dirs_exist_ok=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    def log(metrics, step):
        if env.rank == 0:
            print(json.dumps({"step": step, **metrics}), flush=True)

    # eval generations: every rank holds all rows, so each picks the same prompts (row_id order)
    prompts: list[dict] = []
    if args.stage == "dpo" and cfg.generations.enabled:
        ev = [r for r in rows if r["is_eval"]]
        ev_cols = tokenize_dpo(tok, [r["prompt"] for r in ev], [r["chosen"] for r in ev], [r["rejected"] for r in ev],
                               cfg.data.max_length, cfg.data.max_prompt_length)
        by_id = sorted(range(len(ev)), key=lambda i: ev_cols["row_id"][i])
        prompts = held_out_prompts(({k: ev_cols[k][i] for k in ("prompt_input_ids", "chosen_input_ids")}
                                    for i in by_id), cfg.generations.num_prompts)

    def log_generations(rows, step):
        if env.rank == 0:  # a prefix: lines starting with "{" are the metrics
            print(f"{GENERATIONS_PREFIX}{json.dumps({'step': step, 'rows': rows})}", flush=True)

    hooks = Hooks(train_batches=train_batches, eval_batches=eval_batches, report=report, log=log,
                  progress=lambda s: print(s, flush=True) if env.rank == 0 else None,
                  eval_prompts=lambda k: prompts[:k], log_generations=log_generations)
    run_stage(args.stage, cfg, model, tok, env, hooks)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
