"""Collate functions: padding and label masking only — tokenization already happened in Ray Data.

Plain functions over ``dict[str, np.ndarray]`` batches (list columns arrive as object arrays of
int arrays, or 2-D arrays when every row has the same length), so they run without Ray; Ray's
``iter_torch_batches`` takes them wrapped in `raydpo.data.ray_collate`.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _rows(col) -> list[np.ndarray]:
    """A list column as int64 arrays, one per row."""
    return [np.asarray(x, dtype=np.int64) for x in col]


def collate_dpo(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenated chosen-then-rejected batch.

    Returns ``input_ids``, ``attention_mask``, ``labels`` of shape ``[2B, T]`` — rows ``0..B-1``
    are prompt+chosen, rows ``B..2B-1`` prompt+rejected, right-padded to the longest; labels
    are -100 on the prompt and padding — plus ``ref_chosen_logps`` / ``ref_rejected_logps``
    ``[B]`` when the batch carries precomputed reference log-probs.
    """
    prompts = _rows(batch["prompt_input_ids"])
    seqs, label_rows = [], []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        for p, r in zip(prompts, _rows(batch[key])):
            seqs.append(np.concatenate([p, r]))
            label_rows.append(np.concatenate([np.full(len(p), IGNORE, dtype=np.int64), r]))
    T = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, T), pad_token_id, dtype=np.int64)
    labels = np.full((n, T), IGNORE, dtype=np.int64)
    mask = np.zeros((n, T), dtype=np.int64)
    for i, (s, lab) in enumerate(zip(seqs, label_rows)):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = lab
        mask[i, : len(s)] = 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels)}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            out[key] = torch.as_tensor(np.asarray(batch[key], dtype=np.float32))
    return out


def collate_sft(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Packed blocks ``input_ids`` ``[B, block_size]`` (all the same length: no padding) →
    ``input_ids``, ``labels`` (a copy of the inputs; the model shifts them), ``attention_mask``
    (all ones), int64."""
    ids = torch.from_numpy(np.stack(_rows(batch["input_ids"])))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
