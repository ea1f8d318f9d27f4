"""Collate functions: layout, padding and the scoring index only — tokenization already happened
in Ray Data.

Plain functions over ``dict[str, np.ndarray]`` batches (list columns arrive as object arrays of
int arrays, or 2-D arrays when every row has the same length), so they run without Ray; Ray's
``iter_torch_batches`` takes them wrapped in `raydpo.data.ray_collate`.

DPO layouts (`collate_dpo`), all scored by the same index so the forward
(`raydpo.models.pairs.pair_logps`) is one function whatever the layout:

* **plain** (``share_prefix=False, pack=False``): rows ``0..B-1`` prompt+chosen, ``B..2B-1``
  prompt+rejected, right-padded to the longest, with a 2-D ``attention_mask`` — the
  concatenated layout TRL uses.
* **shared prefix** (``share_prefix=True``; Wang & Hegde 2024, arXiv 2410.20305): one sequence
  per pair, ``prompt + chosen + rejected``. The prompt is computed once. Rejected tokens do not
  see chosen ones (the forward builds that mask from ``seq_ids``/``segments``) and their
  position ids restart after the prompt, so every token sees exactly the context and positions
  it has in the plain layout. The first rejected token is predicted from the last prompt token.
* **padding-free** (``pack=True``): the batch's sequences one after the other in a single row
  ``[1, N]``, no padding at all, with ``spans`` ``[n, 4]`` = (start, prompt, first response,
  second response) lengths of each sequence: the forward runs attention per sequence
  (`raydpo.models.pairs.pair_attention`; causal blocks are skipped, not masked), so nothing is
  computed for padding and nothing attends across sequences. The same pairs per step.

Every layout returns ``input_ids``, ``position_ids``, ``seq_ids`` (sequence index within the
row, -1 on padding), ``segments`` (0 prompt, 1 chosen, 2 rejected, -1 padding), all ``[R, T]``;
the scoring index ``score_pos`` / ``score_tgt`` / ``score_slot`` ``[R, S]`` (token at row
position ``score_pos`` predicts ``score_tgt``, for pair-side ``slot = side * B + pair`` with side 0
chosen, 1 rejected; -1 on padding); ``pair_lengths`` ``[B, 3]`` (prompt, chosen, rejected
tokens); the plain layout also ``attention_mask`` ``[2B, T]``; and ``ref_chosen_logps`` /
``ref_rejected_logps`` ``[B]`` when the batch carries precomputed reference log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def ragged(rows) -> np.ndarray:
    """A 1-D object array of ``rows`` (lists or arrays of token ids), whatever their lengths:
    numpy would make a 2-D array of rows that happen to be equally long; the collate functions
    take one row per element."""
    return np.array(list(rows) + [None], dtype=object)[:-1]


def _rows(col) -> list[np.ndarray]:
    """A list column as int64 arrays, one per row."""
    return [np.asarray(x, dtype=np.int64) for x in col]


@dataclass
class _Seq:
    ids: np.ndarray
    pos: np.ndarray
    seg: np.ndarray
    span: tuple[int, int, int]  # prompt, first response, second response (0 when unshared) lengths
    src: list[int] = field(default_factory=list)  # scoring: position (within the sequence) that predicts
    tgt: list[int] = field(default_factory=list)  # this token
    slot: list[int] = field(default_factory=list)  # for this pair-side


def _score(seq: _Seq, first_src: int, resp: np.ndarray, start: int, slot: int) -> None:
    """Response token j is predicted by ``first_src`` (j = 0) or by its own predecessor at
    ``start + j - 1``; a response at position 0 (no prompt) has no predictor for its first token."""
    for j, t in enumerate(resp.tolist()):
        src = first_src if j == 0 else start + j - 1
        if src >= 0:
            seq.src.append(src)
            seq.tgt.append(t)
            seq.slot.append(slot)


def _single(p: np.ndarray, resp: np.ndarray, kind: int, slot: int) -> _Seq:
    n = len(p) + len(resp)
    seq = _Seq(np.concatenate([p, resp]), np.arange(n), np.concatenate(
        [np.full(len(p), PROMPT), np.full(len(resp), kind)]), (len(p), len(resp), 0))
    _score(seq, len(p) - 1, resp, len(p), slot)
    return seq


def _shared(p: np.ndarray, c: np.ndarray, r: np.ndarray, pair: int, n_pairs: int) -> _Seq:
    P, C, R = len(p), len(c), len(r)
    seq = _Seq(np.concatenate([p, c, r]), np.concatenate([np.arange(P + C), P + np.arange(R)]),
               np.concatenate([np.full(P, PROMPT), np.full(C, CHOSEN), np.full(R, REJECTED)]), (P, C, R))
    _score(seq, P - 1, c, P, pair)
    _score(seq, P - 1, r, P + C, n_pairs + pair)
    return seq


def collate_dpo(batch: dict[str, np.ndarray], pad_token_id: int, *, share_prefix: bool = False,
                pack: bool = False) -> dict[str, torch.Tensor]:
    """A DPO batch of ``B`` pairs in the plain, shared-prefix and/or packed layout (module docstring)."""
    prompts, chosen, rejected = (_rows(batch[k]) for k in ("prompt_input_ids", "chosen_input_ids",
                                                           "rejected_input_ids"))
    B = len(prompts)
    if share_prefix:
        seqs = [_shared(p, c, r, i, B) for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))]
    else:
        seqs = ([_single(p, c, CHOSEN, i) for i, (p, c) in enumerate(zip(prompts, chosen))]
                + [_single(p, r, REJECTED, B + i) for i, (p, r) in enumerate(zip(prompts, rejected))])
    rows = [list(range(len(seqs)))] if pack else [[i] for i in range(len(seqs))]
    T = max(sum(len(seqs[i].ids) for i in row) for row in rows)
    S = max(max(sum(len(seqs[i].src) for i in row) for row in rows), 1)
    n = len(rows)
    ids = np.full((n, T), pad_token_id, dtype=np.int64)
    pos = np.zeros((n, T), dtype=np.int64)
    seq_ids = np.full((n, T), -1, dtype=np.int64)
    segments = np.full((n, T), PAD, dtype=np.int64)
    score_pos = np.zeros((n, S), dtype=np.int64)
    score_tgt = np.zeros((n, S), dtype=np.int64)
    score_slot = np.full((n, S), -1, dtype=np.int64)
    spans = []
    for r, row in enumerate(rows):
        at, k = 0, 0
        for j, i in enumerate(row):
            s, L, m = seqs[i], len(seqs[i].ids), len(seqs[i].src)
            spans.append((at, *s.span))
            ids[r, at:at + L], pos[r, at:at + L], segments[r, at:at + L] = s.ids, s.pos, s.seg
            seq_ids[r, at:at + L] = j
            score_pos[r, k:k + m] = np.asarray(s.src, dtype=np.int64) + at
            score_tgt[r, k:k + m] = s.tgt
            score_slot[r, k:k + m] = s.slot
            at, k = at + L, k + m
    out = {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
           "seq_ids": torch.from_numpy(seq_ids), "segments": torch.from_numpy(segments),
           "score_pos": torch.from_numpy(score_pos), "score_tgt": torch.from_numpy(score_tgt),
           "score_slot": torch.from_numpy(score_slot),
           "pair_lengths": torch.tensor([[len(p), len(c), len(r)] for p, c, r in zip(prompts, chosen, rejected)],
                                        dtype=torch.int64).reshape(B, 3)}
    if pack:
        out["spans"] = torch.tensor(spans, dtype=torch.int64).reshape(-1, 4)
    elif not share_prefix:
        out["attention_mask"] = (out["seq_ids"] >= 0).long()
    for key in REF_KEYS:
        if key in batch:
            out[key] = torch.as_tensor(np.asarray(batch[key], dtype=np.float32))
    return out


def pair_cost(batch: dict[str, Any], share_prefix: bool) -> np.ndarray:
    """Tokens each pair of a numpy batch puts through the model in its layout: the prompt once
    with a shared prefix (``P + C + R``), else once per response (``2P + C + R``)."""
    p, c, r = (np.fromiter((len(x) for x in batch[k]), dtype=np.int64, count=len(batch[k]))
               for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    return (p if share_prefix else 2 * p) + c + r


def rank_cost(stage: str, dpo) -> Callable[[dict[str, Any]], np.ndarray] | None:
    """What `raydpo.data.order.rank_batches` balances the workers by: a DPO pair's tokens with
    ``dpo.balance_ranks`` (`pair_cost`), else nothing (SFT's packed blocks are all one length)."""
    if stage != "dpo" or not dpo.balance_ranks:
        return None
    return partial(pair_cost, share_prefix=dpo.share_prefix)


def pair_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of the batch's pairs as TRL counts them (the prompt once per response:
    ``2P + C + R`` per pair), whatever the layout — the throughput unit every layout shares."""
    L = batch["pair_lengths"]
    return (2 * L[:, 0] + L[:, 1] + L[:, 2]).sum()


def collate_sft(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Packed blocks ``input_ids`` ``[B, block_size]`` (all the same length: no padding) →
    ``input_ids``, ``labels`` (a copy of the inputs; the model shifts them), ``attention_mask``
    (all ones), int64."""
    ids = torch.from_numpy(np.stack(_rows(batch["input_ids"])))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
