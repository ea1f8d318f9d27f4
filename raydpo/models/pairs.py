"""The DPO forward over pairs, and the attention that keeps a packed row's pairs apart.

`pair_logps` scores every pair of a collated batch (`raydpo.data.collate`) in whatever layout
the collate made: padded pairs, a shared prompt per pair, or several pairs packed in one row,
where `pair_attention` masks each sequence from the others. The reference is the same weights
with the LoRA adapter disabled, or a frozen copy of the SFT adapter the policy trains
(`reference_disabled`); `reference_logps` is the one reference scorer, used by the training
step, the reference pass and the torchrun runner alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from raydpo import losses
from raydpo.config import DPOConfig
from raydpo.models.fused_head import fused_head as _fused_head

if TYPE_CHECKING:
    from peft import PeftModel


# the frozen copy of an SFT adapter a DPO policy trains (`raydpo.models.factory.add_reference_copy`)
REF_ADAPTER = "ref"


@contextlib.contextmanager
def reference_disabled(model: PeftModel) -> Iterator[PeftModel]:
    """The DPO reference, under ``torch.no_grad()``: ``model`` with its LoRA adapter disabled —
    with a fresh adapter the base (or merged SFT) model, no second copy of the weights — or, when
    it holds a frozen copy of its adapter (`REF_ADAPTER`: a policy that trains the SFT adapter,
    ``dpo.sft_reference: adapter``), that copy active instead: the SFT model as trained.

    Pass the PeftModel itself (under DeepSpeed, ``engine.module``); calling the engine inside
    the block is fine, the adapter switch is on the shared modules. Switching adapters also sets
    which LoRA weights require grad (PEFT's ``set_adapter``); every flag is as before on exit.
    """
    if REF_ADAPTER not in getattr(model, "peft_config", {}):
        with torch.no_grad(), model.disable_adapter():
            yield model
        return
    active = model.active_adapter
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    model.set_adapter(REF_ADAPTER, inference_mode=True)
    try:
        with torch.no_grad():
            yield model
    finally:
        model.set_adapter(active)
        for p in model.parameters():
            if p.requires_grad != (id(p) in trainable):
                p.requires_grad_(id(p) in trainable)


def pair_attention_mask(seq_ids: torch.Tensor, segments: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """The ``[R, 1, T, T]`` mask of a shared-prefix / packed DPO batch (`raydpo.data.collate`).

    Query i sees key j when both are in the same sequence of the row, j <= i, and not (i is a
    rejected token and j a chosen one): each response sees its prompt and its own prefix, exactly
    its context in the plain layout. Padding sees only itself, so no softmax row is empty (an
    all-masked row gives NaN in SDPA, and NaN * 0 in the backward is still NaN). Boolean (True =
    attend) for SDPA; ``additive`` gives the 0 / -inf float form eager attention adds.
    """
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    cross = (segments[:, :, None] == 2) & (segments[:, None, :] == 1)
    eye = torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    m = ((same & causal & ~cross) | eye).unsqueeze(1)
    if additive:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


PAIR_ATTENTION = "raydpo_pairs"


def pair_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                   dropout: float = 0.0, scaling: float | None = None, raydpo_spans=None, **kwargs):
    """Attention over a padding-free DPO row (`raydpo.data.collate`, ``pack=True``), registered
    with transformers' ``AttentionInterface``: per sequence ``(start, P, A, B)``, the prompt and
    first response attend causally (SDPA ``is_causal``: the blocks above the diagonal are skipped,
    not computed and masked), and a second response (shared prefix) attends the prompt and
    itself only. No attention crosses sequences and no position is padding, so this equals the
    masked attention of the other layouts. ``query`` ``[1, H, N, D]``; returns ``[1, N, H, D]``.
    """
    import torch.nn.functional as F

    if raydpo_spans is None:
        raise RuntimeError(f"{PAIR_ATTENTION} attention needs the batch's spans (call models.pair_logps)")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: the per-sequence calls below take as many key heads as query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # one split per tensor, not a slice per sequence: a slice's backward writes a full-length
    # zero tensor per sequence, a split's backward is one concatenation
    sizes = [n for _, p, a, b in raydpo_spans for n in (p + a, b)]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    outs = []
    for i, (_, p, a, b) in enumerate(raydpo_spans):
        q1, k1, v1 = qs[2 * i], ks[2 * i], vs[2 * i]
        outs.append(F.scaled_dot_product_attention(q1, k1, v1, dropout_p=dropout, is_causal=True, scale=scaling))
        if b:
            k = torch.cat([k1[:, :, :p], ks[2 * i + 1]], dim=2)
            v = torch.cat([v1[:, :, :p], vs[2 * i + 1]], dim=2)
            mask = torch.ones(b, p + b, dtype=torch.bool, device=query.device)
            mask[:, p:] = torch.ones(b, b, dtype=torch.bool, device=query.device).tril()
            outs.append(F.scaled_dot_product_attention(qs[2 * i + 1], k, v, attn_mask=mask, dropout_p=dropout,
                                                       scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def packed_attention(model, batch: dict[str, torch.Tensor]):
    """The scope in which a padding-free batch (one with ``spans``) must be both run forward *and*
    backpropagated: gradient checkpointing recomputes each layer inside the backward, and the
    recomputation must use the same per-sequence attention as the forward (outside it the model
    is back on sdpa/eager, which saves other tensors: torch's checkpoint fails with "a different
    number of tensors was saved"). Other layouts: nothing to do. Nested scopes are fine."""
    return _attention(model, PAIR_ATTENTION) if "spans" in batch else contextlib.nullcontext()


@contextlib.contextmanager
def _attention(model, name: str) -> Iterator[None]:
    """Run ``model`` with the attention implementation ``name`` (registered once), then restore it."""
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, pair_attention)
    config = getattr(getattr(model, "module", model), "config")
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _attn_implementation(model) -> str:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the PeftModel
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) or "sdpa"


TILE_TOKENS = DPOConfig.model_fields["lm_head_tile_tokens"].default


def head_options(dpo: DPOConfig) -> dict[str, bool | int]:
    """The LM-head keywords of `pair_logps` and `reference_logps` as a DPO config sets them: the
    training step, the reference pass and the runners all pass ``**head_options(cfg.dpo)``."""
    return {"completion_only": dpo.completion_only_logits, "fused_head": dpo.fused_lm_head,
            "tile_tokens": dpo.lm_head_tile_tokens}


def pair_logps(model, batch: dict[str, torch.Tensor], completion_only: bool = True, fused_head: bool = True,
               tile_tokens: int = TILE_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """THE DPO forward: one pass over a collated batch of ``B`` pairs (any layout of
    `raydpo.data.collate.collate_dpo`) -> ``(chosen_logps, rejected_logps, chosen_tokens,
    rejected_tokens)``, each ``[B]``; log-probs are fp32 sums over the response tokens.

    ``completion_only``: the LM head and the fp32 log-softmax run on the scored positions only
    (``logits_to_keep`` = the ``[R, S]`` scoring index), never on prompt or padding positions —
    no ``[R, T, V]`` logits. Off: full logits, then the same positions are picked (the plain path,
    kept for the ablation and the equality tests). ``fused_head`` (with ``completion_only``):
    not even ``[R, S, V]`` logits — the head's log-probs ``tile_tokens`` positions at a time
    (`raydpo.models.fused_head`), where the head allows it. The training loop, the reference pass
    and the tests all call this. ``model`` is anything callable like a HF causal LM (PeftModel,
    DeepSpeed engine); the reference is this call under `reference_disabled`.
    """
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if "spans" in batch:  # padding-free: attention per sequence, no mask
        kw["raydpo_spans"] = batch["spans"].tolist()
    elif "attention_mask" in batch:  # plain layout: the model builds its causal + padding mask
        kw["attention_mask"] = batch["attention_mask"]
    else:  # shared prefix in padded rows
        kw["attention_mask"] = pair_attention_mask(batch["seq_ids"], batch["segments"],
                                                   additive=_attn_implementation(model) == "eager")
    with packed_attention(model, batch):  # a caller that backpropagates holds it open until after backward
        tok = _scored_logps(model, kw, batch, completion_only, fused_head, tile_tokens)
    slot = batch["score_slot"]
    valid = slot >= 0
    tok = tok * valid
    B = batch["pair_lengths"].shape[0]
    idx = slot.clamp(min=0).reshape(-1)
    sums = torch.zeros(2 * B, dtype=torch.float32, device=tok.device).index_add(0, idx, tok.reshape(-1))
    counts = torch.zeros(2 * B, dtype=torch.int64, device=tok.device).index_add(0, idx, valid.reshape(-1).long())
    return sums[:B], sums[B:], counts[:B], counts[B:]


def _scored_logps(model, kw: dict, batch: dict[str, torch.Tensor], completion_only: bool, fused_head: bool,
                  tile_tokens: int) -> torch.Tensor:
    """``[R, S]`` fp32 log p(score_tgt) at the scoring index, from the one model call."""
    pos, tgt = batch["score_pos"], batch["score_tgt"]
    if not completion_only:
        full = model(**kw).logits  # [R, T, V]
        logits = torch.take_along_dim(full, pos[..., None], dim=1)
        del full
        return losses.token_logps(logits, tgt)
    with _fused_head(model, tgt, tile_tokens) if fused_head else contextlib.nullcontext(False) as fused:
        out = model(**kw, logits_to_keep=pos).logits  # fused: [R, S] log-probs already; else [R, S, V]
    return out if fused else losses.token_logps(out, tgt)


def reference_logps(model: PeftModel, batch: dict[str, torch.Tensor], *, completion_only: bool = True,
                    fused_head: bool = True, tile_tokens: int = TILE_TOKENS,
                    engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-prob sums ``([B], [B])`` (chosen, rejected) of a collated batch: the training
    forward (`pair_logps`, through ``engine`` when training wraps the model, else ``model``) as
    `reference_disabled`: ``model``'s LoRA adapter disabled, so no second model is held in memory,
    or its frozen reference copy of the SFT adapter active."""
    with reference_disabled(model):
        chosen, rejected, _, _ = pair_logps(engine if engine is not None else model, batch,
                                            completion_only=completion_only, fused_head=fused_head,
                                            tile_tokens=tile_tokens)
    return chosen, rejected
