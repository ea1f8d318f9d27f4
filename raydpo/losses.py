"""Pure loss maths: sequence log-probs, the DPO loss family (as TRL 1.16 defines it), SFT loss,
and reward metrics as *sums* so ranks can all-reduce before dividing.

Conventions: per-example tensors are ``[B]``; log-probs are fp32 **sums** over the response
tokens (`sequence_logps`); rewards are ``beta * (policy - reference)`` log-probs, detached.

IPO and length normalisation. TRL 1.16 (``DPOTrainer._compute_loss``) feeds IPO the *per-token
average* log-ratio: ``delta = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r`` with ``n`` the number of
response tokens (``clamp(min=1)``; the scored labels here, the same count whenever a prompt
precedes the response), while rewards and ``logps/*`` metrics stay on the sums. Two
ways to get it here:

* exact TRL parity, metrics included: pass summed log-probs plus ``chosen_lengths`` /
  ``rejected_lengths`` (``sequence_logps(..., return_count=True)`` gives them);
* or pass averaged log-probs (``sequence_logps(..., average=True)``) for policy *and* reference
  and no lengths: the IPO loss is identical (policy and reference share the token mask), but
  rewards and ``logps/*`` are then per-token averages.

Two deliberate notes against TRL 1.16:

* ``sigmoid`` keeps conservative DPO (cDPO): with ``label_smoothing = ε`` the loss is
  ``-(1-ε)·logσ(βz) - ε·logσ(-βz)``, as TRL < 1.0 defined it. TRL 1.16 ignores label smoothing
  for ``sigmoid`` (it only uses it in ``robust``/``exo_pair``); at ``ε = 0`` — the default — the
  two are identical. We keep it rather than silently dropping a value the user set.
* ``bco_pair`` in TRL 1.16 has no running mean: ``-logσ(r_c) - logσ(-r_r)``. Older TRL
  subtracted a running mean δ of the rewards; ``running_mean=δ`` reproduces that, and the
  default ``0.0`` is exactly TRL 1.16. Keeping δ up to date is the caller's job (this module
  holds no state).

Imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
METRIC_KEYS = (LOSS, REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_ACCURACIES, REWARDS_MARGINS,
               LOGPS_CHOSEN, LOGPS_REJECTED)
COUNT = "count"


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 ``log p(target)`` per position: logits ``[B, S, V]`` (any float dtype), targets
    ``[B, S]`` -> ``[B, S]``, as ``logit[target] - logsumexp(logits)``, one row at a time, so
    without grad at most one fp32 ``[S, V]`` row is live and never a full ``log_softmax``
    beside the logits. The one rule for a token's log-prob: `sequence_logps` and
    `raydpo.models.pair_logps` both use it."""
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b].float()
        rows.append(row.gather(-1, targets[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   average: bool = False, return_count: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean, ``average=True``) over each sequence of log p(label_t | tokens < t).

    logits ``[B, T, V]`` (any float dtype), labels ``[B, T]`` with ``ignore_index`` where no
    loss is taken. Position t's logits predict label t+1 (labels are shifted left by one);
    masked labels are replaced by 0 before the gather and their terms zeroed. Computed in fp32
    as ``logit[label] - logsumexp(logits)``, one row at a time: without grad at most one fp32
    ``[T, V]`` row is live; with grad autograd keeps each row's fp32 copy for logsumexp's
    backward (one fp32 ``[B, T, V]`` in all for bf16 logits, none extra for fp32 logits) —
    never a full ``log_softmax`` next to it. Returns ``[B]`` fp32; with ``return_count`` also
    the number of scored tokens ``[B]`` (int64) — IPO's length normaliser. A row with no
    scored token gives 0 (sum and average), never NaN.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    total = (token_logps(logits, safe) * mask).sum(-1)
    count = mask.sum(-1)
    if average:
        total = total / count.clamp(min=1)
    return (total, count) if return_count else total


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean next-token cross entropy in fp32. logits ``[B, T, V]``, labels ``[B, T]``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=ignore_index)


# -- DPO family: each takes z = (pi_c - ref_c) - (pi_r - ref_r), unscaled, plus keyword pieces ------


def _sigmoid(z, beta, label_smoothing, **_):
    # cDPO; label_smoothing = 0 is TRL 1.16's sigmoid
    return -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing


def _robust(z, beta, label_smoothing, **_):
    # TRL 1.16: (clean - flipped) / (1 - 2ε), clean = -(1-ε)·logσ(βz), flipped = -ε·logσ(-βz)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return (-F.logsigmoid(beta * z) * (1 - label_smoothing)
            + F.logsigmoid(-beta * z) * label_smoothing) / (1 - 2 * label_smoothing)


def _hinge(z, beta, **_):
    return torch.relu(1 - beta * z)


def _ipo(z, beta, chosen_logratio, rejected_logratio, chosen_lengths=None, rejected_lengths=None, **_):
    # TRL 1.16: (z̄ - 1/(2β))² (eq. 17 of the IPO paper, β is its τ) on per-token average
    # log-ratios; without lengths the caller already averaged (see the module docstring)
    if chosen_lengths is not None:
        z = (chosen_logratio / chosen_lengths.float().clamp(min=1)
             - rejected_logratio / rejected_lengths.float().clamp(min=1))
    return (z - 1 / (2 * beta)) ** 2


def _bco_pair(z, beta, chosen_rewards, rejected_rewards, running_mean=0.0, **_):
    # δ = 0 is TRL 1.16; older TRL subtracted a running mean of the rewards
    return -F.logsigmoid(chosen_rewards - running_mean) - F.logsigmoid(-(rejected_rewards - running_mean))


LOSS_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "bco_pair": _bco_pair,
}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, running_mean: float | torch.Tensor = 0.0,
             *, chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and rewards, all ``[B]`` fp32.

    ``z = (pi_c - ref_c) - (pi_r - ref_r)``; ``chosen_rewards = beta*(pi_c - ref_c)``,
    ``rejected_rewards = beta*(pi_r - ref_r)`` (detached). Per type (σ = sigmoid, ε =
    ``label_smoothing``, r = rewards):

    * ``sigmoid``  ``-(1-ε)·logσ(βz) - ε·logσ(-βz)`` (cDPO; ε = 0 is TRL 1.16)
    * ``robust``   ``(-(1-ε)·logσ(βz) + ε·logσ(-βz)) / (1-2ε)``, ε < 0.5
    * ``hinge``    ``relu(1 - βz)``
    * ``ipo``      ``(z̄ - 1/(2β))²`` with z̄ on per-token averages: pass ``chosen_lengths`` /
      ``rejected_lengths`` ``[B]`` with summed log-probs, or averaged log-probs and no lengths
    * ``bco_pair`` ``-logσ(r_c - δ) - logσ(-(r_r - δ))``, δ = ``running_mean`` (a pure function:
      the caller keeps the running mean of the rewards; the default 0.0 is exactly TRL 1.16)

    Only ``ipo`` reads the lengths and only ``bco_pair`` reads ``running_mean``. Valid types:
    the keys of `LOSS_FNS`; anything else raises ValueError. Works on any shape, including the
    1-element zeros the step-0 sanity check passes.
    """
    fn = LOSS_FNS.get(loss_type)
    if fn is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(LOSS_FNS))}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
    losses = fn(chosen_logratio - rejected_logratio, beta=beta, label_smoothing=label_smoothing,
                chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
                chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, running_mean=running_mean,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-dim sums of every metric plus ``count``: add across micro-batches and ranks, then
    `finalize_metrics` — the result is the global mean, whatever the split."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        LOSS: losses.detach().float().sum(),
        REWARDS_CHOSEN: c.sum(),
        REWARDS_REJECTED: r.sum(),
        REWARDS_ACCURACIES: (c > r).float().sum(),
        REWARDS_MARGINS: (c - r).sum(),
        LOGPS_CHOSEN: policy_chosen_logps.detach().float().sum(),
        LOGPS_REJECTED: policy_rejected_logps.detach().float().sum(),
        COUNT: torch.tensor(float(c.numel()), device=c.device),
    }


def finalize_metrics(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Divide every summed metric by ``count`` -> plain floats (``count`` itself is dropped).

    Generic over keys: the DPO loop passes `dpo_metric_sums` (added over micro-batches and
    all-reduced over ranks), the SFT loop only ``{"loss", "count"}``.
    """
    n = float(sums[COUNT])
    if n <= 0:
        raise ValueError("no examples were counted")
    return {k: float(v) / n for k, v in sums.items() if k != COUNT}
