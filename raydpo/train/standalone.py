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
from typing import TYPE_CHECKING, Callable

from raydpo import storage

if TYPE_CHECKING:
    from raydpo.train.engine import WorkerEnv

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


def main(argv: list[str] | None = None) -> None:
    """Every rank takes these steps in this order (the model path, the eval row count and the
    loop's own all-reduces are collectives)."""
    import torch
    import torch.distributed as dist

    from raydpo.config import load_config
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.loop import Hooks, run_stage

    args = parse_args(argv)
    stage = args.stage
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg)
    path = shared_model_path(cfg, env)
    tok = load_tokenizer(path)
    rows = _rows(cfg, stage, path)
    # training: every rank holds all train rows and walks the same stream (raydpo.data.order),
    # keeping its slice of each global micro-batch, as the Ray workers do
    train_cols = tokenize_rows(tok, cfg, stage, [r for r in rows if not r["is_eval"]])
    # evaluation: each rank its share, the same number of rows on every rank (the metric
    # all-reduce is collective), the last partial batch kept
    eval_cols = tokenize_rows(tok, cfg, stage, [r for r in rows if r["is_eval"]][env.rank::env.world_size])
    if stage == "sft":  # this rank's share packed in the eval order, as the Ray path packs the split
        from raydpo.data.reach import EVAL_EPOCH

        blocks = sft_blocks(eval_cols, cfg, 0, 1, epoch=EVAL_EPOCH)
        eval_cols = {"input_ids": blocks, "row_id": list(range(len(blocks)))}
    n_eval = fewest_on_any_rank(len(eval_cols["row_id"]), env)
    model = load_policy(cfg, stage, path, env)
    if stage == "dpo" and cfg.dpo.precomputed_reference:  # none for a reference-free loss
        # the reference pass, in-process, before training: the train rows (the same on every rank)
        # split over the ranks and exchanged, each rank's own eval rows by itself
        from raydpo.train.ref_scoring import add_reference

        add_reference(model, train_cols, tok.pad_token_id, cfg.dpo, env.device, rank=env.rank, world=env.world_size)
        add_reference(model, eval_cols, tok.pad_token_id, cfg.dpo, env.device)
    if env.use_gpu:  # train/peak_memory_gb: the training's peak, as on a Ray worker (no reference pass there)
        torch.cuda.reset_peak_memory_stats(env.device)

    collate = collate_fn(cfg, stage, tok.pad_token_id)
    prompts = generation_prompts(tok, cfg, stage, rows)
    hooks = Hooks(train_batches=train_stream(train_cols, collate, cfg, stage, env),
                  eval_batches=eval_share(eval_cols, n_eval, collate, cfg.stage(stage).per_device_batch_size),
                  report=copy_checkpoints(storage.standalone_dir(cfg.run.storage_path, cfg.run.name, stage)),
                  log=rank0_metrics(env.rank),
                  progress=lambda s: print(s, flush=True) if env.rank == 0 else None,
                  eval_prompts=lambda k: prompts[:k], log_generations=rank0_generations(env.rank))
    run_stage(stage, cfg, model, tok, env, hooks)
    dist.barrier()
    dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--stage", choices=["sft", "dpo"], default="dpo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p.parse_args(argv)


def init_distributed(cfg) -> WorkerEnv:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU): this rank's `WorkerEnv`."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from raydpo.train.deepspeed import comm_backend
    from raydpo.train.engine import env_from_torch

    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    dist.init_process_group(comm_backend(use_gpu), timeout=timedelta(seconds=cfg.scaling.collective_timeout()))
    return env_from_torch(use_gpu)


def shared_model_path(cfg, env: WorkerEnv) -> str:
    """The base model's local folder: rank 0 materializes the tiny model (or finds the model) once,
    and every rank uses its path."""
    import torch.distributed as dist

    from raydpo.models.factory import resolve_model_path

    obj = [resolve_model_path(cfg.model) if env.rank == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def tokenize_rows(tok, cfg, stage: str, rows: list[dict]) -> dict[str, list]:
    """The stage's token columns of ``rows``: SFT examples with their ids (packed in the run's
    order: `sft_blocks`), or DPO pairs."""
    from raydpo.data.packing import EXAMPLE_IDS, example_ids
    from raydpo.data.tokenize import sft_examples, tokenize_dpo

    if stage == "sft":
        return {EXAMPLE_IDS: sft_examples(tok, [r["prompt"] + r["chosen"] for r in rows],
                                          [r["templated"] for r in rows]),
                "row_id": example_ids([r["prompt"] for r in rows], [r["chosen"] for r in rows]).tolist()}
    return tokenize_dpo(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                        cfg.data.max_length, cfg.data.max_prompt_length, [r["templated"] for r in rows])


def collate_fn(cfg, stage: str, pad_token_id: int) -> Callable[[dict], dict]:
    from raydpo.data.collate import collate_dpo, collate_sft

    if stage == "sft":
        return collate_sft
    return partial(collate_dpo, pad_token_id=pad_token_id, share_prefix=cfg.dpo.share_prefix,
                   pack=cfg.dpo.padding_free)


def _pick(cols: dict[str, list], idx) -> dict:
    from raydpo.data.collate import ragged

    return {k: ragged(v[i] for i in idx) for k, v in cols.items()}


def train_stream(cols: dict[str, list], collate, cfg, stage: str, env: WorkerEnv):
    """`Hooks.train_batches`: the run's whole ordered stream of ``cols`` (every epoch it needs),
    this rank's slice of each global micro-batch, from micro-batch ``skip`` on."""
    import numpy as np

    from raydpo.data.order import epoch_order, epochs_needed, rank_batches, usable_rows
    from raydpo.data.collate import rank_cost

    st = cfg.stage(stage)
    bs = st.per_device_batch_size
    g, micro = bs * env.world_size, st.max_steps * st.gradient_accumulation_steps
    if stage == "sft":  # the blocks of each epoch, already in the run's order
        cols = {"input_ids": sft_blocks(cols, cfg, g * micro, g)}
        cols["row_id"] = list(range(len(cols["input_ids"])))
    n_train = len(cols["row_id"])

    def train_batches(skip: int):
        if stage == "sft":
            stream = np.arange(n_train)
        else:
            stream = np.concatenate([epoch_order(cols["row_id"], cfg.data.seed, e)[:usable_rows(n_train, g)]
                                     for e in range(epochs_needed(n_train, g, micro))])

        def numpy_batches(n):
            for lo in range(0, len(stream) - n + 1, n):
                yield _pick(cols, stream[lo:lo + n])
        return rank_batches(numpy_batches, bs, env.world_size, env.rank, collate, skip, cost=rank_cost(stage, cfg.dpo))

    return train_batches


def sft_blocks(examples: dict[str, list], cfg, rows: int, global_batch: int, epoch: int | None = None) -> list:
    """SFT blocks (`raydpo.data.packing`): epoch 0, 1, ... each cut to whole global batches,
    until ``rows`` blocks; or, given ``epoch``, that one order packed whole (evaluation)."""
    import numpy as np

    from raydpo.data.order import usable_rows
    from raydpo.data.packing import EXAMPLE_IDS, epoch_blocks

    d = cfg.data

    def pack(e):
        return epoch_blocks(examples[EXAMPLE_IDS], np.asarray(examples["row_id"], np.int64), d.seed, e,
                            d.sft_block_size, d.tokenize_batch_size)
    if epoch is not None:
        return pack(epoch)
    blocks: list = []
    e = 0
    while len(blocks) < rows:
        one = pack(e)
        keep = usable_rows(len(one), global_batch)
        if keep == 0:
            raise ValueError(f"sft: {len(one)} packed blocks, fewer than one global batch of {global_batch}")
        blocks, e = blocks + one[:keep], e + 1
    return blocks[:rows]


def fewest_on_any_rank(n: int, env: WorkerEnv) -> int:
    """The smallest ``n`` of all ranks (an all-reduce: every rank calls it)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def eval_share(cols: dict[str, list], n_eval: int, collate, bs: int):
    """`Hooks.eval_batches`: this rank's first ``n_eval`` eval rows in batches of ``bs``."""
    def eval_batches():
        for lo in range(0, n_eval, bs):
            yield collate(_pick(cols, range(lo, min(lo + bs, n_eval))))
    return eval_batches


def load_policy(cfg, stage: str, path: str, env: WorkerEnv):
    import torch

    from raydpo.models.factory import load_model
    from raydpo.train.deepspeed import engine_cast_dtype

    torch.manual_seed(cfg.stage(stage).seed)  # the fresh adapter's init: the same on every rank and every run
    # in the engine's numerics already: the in-process reference pass scores this model before
    # DeepSpeed is built
    return load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path, device=env.device,
                      engine_dtype=engine_cast_dtype(cfg, env.use_gpu))


def copy_checkpoints(out_dir: Path) -> Callable[[dict[str, float], str | None], None]:
    """`Hooks.report`: each checkpoint copied to ``out_dir/step_<n>`` (no Ray to take it)."""
    def report(metrics, ckpt_dir):
        if ckpt_dir:
            dest = storage.standalone_step_dir(out_dir, int(metrics['step']))
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(ckpt_dir, dest, dirs_exist_ok=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def rank0_metrics(rank: int) -> Callable[[dict[str, float], int], None]:
    """`Hooks.log`: rank 0 prints each step's metrics as one JSON line (the lines starting with "{")."""
    def log(metrics, step):
        if rank == 0:
            print(json.dumps({"step": step, **metrics}), flush=True)
    return log


def generation_prompts(tok, cfg, stage: str, rows: list[dict]) -> list[dict]:
    """The eval generations' prompts: every rank holds all rows, so each picks the same ones (row_id
    order); none for SFT or when generations are off."""
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.train.generate import held_out_prompts

    if stage != "dpo" or not cfg.generations.enabled:
        return []
    ev = [r for r in rows if r["is_eval"]]
    ev_cols = tokenize_dpo(tok, [r["prompt"] for r in ev], [r["chosen"] for r in ev], [r["rejected"] for r in ev],
                           cfg.data.max_length, cfg.data.max_prompt_length)
    by_id = sorted(range(len(ev)), key=lambda i: ev_cols["row_id"][i])
    return held_out_prompts(({k: ev_cols[k][i] for k in ("prompt_input_ids", "chosen_input_ids")}
                             for i in by_id), cfg.generations.num_prompts)


def rank0_generations(rank: int) -> Callable[[list[dict], int], None]:
    """`Hooks.log_generations`: rank 0 prints the table on one line after `GENERATIONS_PREFIX`."""
    def log_generations(rows, step):
        if rank == 0:  # a prefix: lines starting with "{" are the metrics
            print(f"{GENERATIONS_PREFIX}{json.dumps({'step': step, 'rows': rows})}", flush=True)
    return log_generations


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
