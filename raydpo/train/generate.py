"""Eval generations: what the policy and the reference actually write for a few held-out prompts.

The prompts are fixed for the whole run (`held_out_prompts`: the first ``generations.num_prompts``
distinct prompts of the eval split in ``row_id`` order, chosen on the driver and handed to every
rank as plain data), so the tables of successive evaluations compare like with like. The
reference is the same model with the LoRA adapter disabled (`raydpo.models.pairs.reference_disabled`).

`eval_generations` runs ``model.generate`` of the PEFT model (``engine.module``) in eval mode under
``no_grad``. Under ZeRO-3 the weights are partitioned and every forward is collective: every rank
generates the same prompts with ``synced_gpus`` (a rank that finished keeps joining the others'
forwards); otherwise rank 0 alone generates. The torch RNG (CPU and CUDA) is forked around the
call and sampling is seeded by ``(seed, step)``, so the training steps after it draw exactly what
they would have drawn without it (exact resume holds) and a sampled table is reproducible.

Nothing here imports Ray or MLflow: the loop hands the rows to ``hooks.log_generations``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from raydpo.config import GenerationsConfig
from raydpo.models.pairs import reference_disabled

COLUMNS = ("step", "prompt_index", "prompt", "policy", "reference", "chosen")
CHUNK = 8  # prompts per generate call: bounds memory whatever num_prompts is


def held_out_prompts(rows: Iterable[Mapping[str, Any]], k: int) -> list[dict[str, list[int]]]:
    """The first ``k`` distinct prompts of ``rows`` (eval rows already in a deterministic order,
    e.g. sorted by ``row_id``), each with the chosen response of its first pair:
    ``[{"prompt_input_ids": [...], "chosen_input_ids": [...]}, ...]``. A prompt shared by several
    pairs counts once."""
    out, seen = [], set()
    for r in rows:
        p = [int(t) for t in r["prompt_input_ids"]]
        if tuple(p) in seen:
            continue
        seen.add(tuple(p))
        out.append({"prompt_input_ids": p, "chosen_input_ids": [int(t) for t in r.get("chosen_input_ids", [])]})
        if len(out) == k:
            break
    return out


def due(gen: GenerationsConfig, last: bool) -> bool:
    """Whether an evaluation (every ``eval_every`` steps, and the last step) also generates."""
    return gen.enabled and (gen.when == "eval" or last)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, T]`` ids and attention mask, padded on the left so every row continues at column T."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _generate(model, tokenizer, prompts: list[list[int]], gen: GenerationsConfig, device, synced: bool) -> list[str]:
    texts = []
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k) if gen.do_sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # a model's sampling defaults off
    for lo in range(0, len(prompts), CHUNK):
        chunk = prompts[lo:lo + CHUNK]
        ids, mask = _left_padded(chunk, tokenizer.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True, synced_gpus=synced, **sampling)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def eval_generations(model, tokenizer, prompts: list[dict[str, list[int]]], gen: GenerationsConfig, *, step: int,
                     seed: int, rank: int, world_size: int, device) -> list[dict[str, Any]]:
    """Completions of ``prompts`` by the policy and the reference, one row per prompt with the
    columns `COLUMNS` (texts decoded without special tokens). Call it on every rank; ranks
    other than 0 return ``[]``. ``model`` is the PEFT model (under DeepSpeed, ``engine.module``)."""
    if not prompts:
        return []
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3: forwards are collective
    if rank != 0 and not partitioned:
        return []
    synced = partitioned and world_size > 1
    ids = [p["prompt_input_ids"] for p in prompts]
    was_training = model.training
    model.eval()
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + step)  # sampled tables are reproducible, resumed or not
            policy = _generate(model, tokenizer, ids, gen, device, synced)
            with reference_disabled(model):
                reference = _generate(model, tokenizer, ids, gen, device, synced)
    finally:
        model.train(was_training)
    if rank != 0:
        return []
    return [{"step": int(step), "prompt_index": i,
             "prompt": tokenizer.decode(p["prompt_input_ids"], skip_special_tokens=True),
             "policy": policy[i], "reference": reference[i],
             "chosen": tokenizer.decode(p.get("chosen_input_ids", []), skip_special_tokens=True)}
            for i, p in enumerate(prompts)]
