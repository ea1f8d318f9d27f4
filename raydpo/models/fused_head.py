"""The fused, tiled LM head: each scored position's fp32 ``log p(target)`` straight from the final
hidden states, a tile of positions at a time, never the ``[rows, scored, vocab]`` logits.

The plain completion-only head (`raydpo.models.pairs.pair_logps`) projects every scored position
to the vocabulary at once, and `raydpo.losses.token_logps` keeps the fp32 logits for the
backward: ``S·V·4`` bytes, the largest activation of a 7B step. Here each tile of
``tile_tokens`` positions is projected (in the weight's dtype), its fp32 logsumexp and target
logit taken exactly as `token_logps` takes them, and the tile dropped: at most one ``[tile, V]``
logits tensor (its fp32 copy, logsumexp's fp32 temporary) is alive, forward and backward alike.

The backward. A frozen head (every LoRA run: PEFT never trains ``lm_head`` unless it is a target,
and then it is no plain ``nn.Linear``) needs only the hidden states' gradient, and
``d log p(t) / dh = (onehot(t) - p) @ W`` is known in the forward: each tile computes it there
(``[tile, H]``, the one matmul the plain backward would run) and that is what is saved, not the
hidden states; the backward only scales it by the incoming gradient — no projection recomputed.
A trained head (its weight or bias requires grad): the forward saves the hidden states, the
targets and the fp32 logsumexp, and the backward recomputes each tile's logits for the gradients
of the hidden states and of the weight, reading the weight from the module at that moment.

DeepSpeed ZeRO-3 keeps the head's weight partitioned outside the head module's own call, so the
computation runs *inside* that call (`fused_head` swaps the module's ``forward`` while the model
runs): ZeRO-3's module hooks gather the weight for the forward, and again before the backward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

# logit transforms a model applies after ``lm_head`` (the names TRL 1.16's ``add_fused_lm_head``
# reads): with any of them set, the head's output is not the logits the log-softmax must see
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling")


def _tile_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[n, V]`` fp32 logits of one tile, projected in the weight's dtype as the plain head is."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


def _dlogp_dlogits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``onehot(target) - softmax`` ``[n, V]`` fp32, in place over the tile's fp32 logits ``z``."""
    z.sub_(lse[:, None]).exp_().neg_()
    return z.scatter_add_(1, targets[:, None], torch.ones_like(z[:, :1]))


class TiledTargetLogps(torch.autograd.Function):
    """``[N]`` fp32 ``log softmax(hidden @ weight.T + bias)[target]``, ``tile`` positions at a time.

    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]`` int64; ``head`` is
    the module the weight belongs to (read again in a trained head's backward, see the module
    docstring); ``grad``: whether grad mode was on at the call (inside ``forward`` it is always
    off, and ``ctx.needs_input_grad`` ignores it): off, nothing is saved or computed for a
    backward. Saves ``[N, H]`` and ``[N]`` tensors only, never a ``[*, V]`` one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, tile, grad):
        need_h, need_w, need_b = (n and grad for n in ctx.needs_input_grad[:3])
        ctx.recompute = need_w or need_b
        jac = need_h and not ctx.recompute  # the frozen head's gradient, computed here
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        grad_dir = hidden.new_empty(hidden.shape, dtype=weight.dtype) if jac else None
        for lo in range(0, hidden.shape[0], tile):
            t = targets[lo:lo + tile]
            z = _tile_logits(hidden[lo:lo + tile], weight, bias)
            lse[lo:lo + tile] = torch.logsumexp(z, dim=-1)
            out[lo:lo + tile] = z.gather(-1, t[:, None]).squeeze(-1) - lse[lo:lo + tile]
            if jac:
                grad_dir[lo:lo + tile] = _dlogp_dlogits(z, lse[lo:lo + tile], t).to(weight.dtype) @ weight
            del z
        if jac:
            ctx.save_for_backward(grad_dir)
        elif ctx.recompute:
            ctx.save_for_backward(hidden, targets, lse)
            ctx.head, ctx.tile = head, tile
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.recompute:
            (grad_dir,) = ctx.saved_tensors
            return (grad[:, None] * grad_dir).to(ctx.hidden_dtype), None, None, None, None, None, None
        return (*_recomputed_grads(ctx, grad), None, None, None, None)


def _recomputed_grads(ctx, grad: torch.Tensor):
    """A trained head's backward: each tile's logits again, ``g·(onehot - softmax)`` in fp32, cast
    to the weight's dtype for the hidden states' gradient as autograd casts the plain head's, and
    accumulated in fp32 for the weight's and the bias's."""
    hidden, targets, lse = ctx.saved_tensors
    weight, bias = ctx.head.weight, ctx.head.bias  # under ZeRO-3: gathered for this module's backward
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    gh = torch.empty_like(hidden) if need_h else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for lo in range(0, hidden.shape[0], ctx.tile):
        h = hidden[lo:lo + ctx.tile]
        d = _dlogp_dlogits(_tile_logits(h, weight, bias), lse[lo:lo + ctx.tile], targets[lo:lo + ctx.tile])
        d.mul_(grad[lo:lo + ctx.tile, None])
        if need_h:
            gh[lo:lo + ctx.tile] = d.to(weight.dtype) @ weight
        if need_w:
            gw.addmm_(d.t(), h.float())
        if need_b:
            gb.add_(d.sum(0))
        del d
    return gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype)


def plain_head(model) -> tuple[torch.nn.Linear | None, str]:
    """``(the model's LM head, "")`` when the fused head can stand in for it, else ``(None, why
    not)``: the head must be a plain ``nn.Linear`` (not LoRA on ``lm_head``, not a quantized
    layer, not already wrapped by someone's ``forward``), its output the logits as they are (no
    soft-capping or scaling after it) and no autocast on. ``model``: anything `pair_logps` takes."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the PeftModel
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None, f"the LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA on it? quantized?)"
    if "forward" in vars(head):
        return None, "the LM head's forward is already replaced (a hook?)"
    text = inner.config.get_text_config()
    scaled = [k for k in SCALED_LOGITS if getattr(text, k, None) not in (None, 1, 1.0)]
    if scaled:
        return None, f"the model transforms the logits after the head ({', '.join(scaled)})"
    if torch.is_autocast_enabled(head.weight.device.type):
        return None, "autocast is on"
    return head, ""


@contextlib.contextmanager
def fused_head(model, targets: torch.Tensor, tile_tokens: int) -> Iterator[bool]:
    """While open, the model's LM head returns ``[R, S]`` fp32 ``log p(targets)`` for its
    ``[R, S, H]`` input (`TiledTargetLogps`) instead of logits: call the model with
    ``logits_to_keep`` = the scored positions and read ``.logits``. Yields False (and warns, once
    per reason) where `plain_head` says it cannot: the head is then untouched."""
    head, why = plain_head(model)
    if head is None:
        warnings.warn(f"dpo.fused_lm_head: {why}; the plain completion-only head runs instead", stacklevel=3)
        yield False
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = TiledTargetLogps.apply(flat, head.weight, head.bias, targets.reshape(-1), head, tile_tokens,
                                     torch.is_grad_enabled())
        return out.view(targets.shape)

    head.forward = forward
    try:
        yield True
    finally:
        del head.forward
