"""Pure loss maths: sequence log-probs, the DPO loss family (as TRL 1.16 defines it), SFT loss,
and reward metrics as *sums* so ranks can all-reduce before dividing.

Conventions: per-example tensors are ``[B]``; rewards are ``beta * (policy - reference)``
log-probs, detached. For ``ipo`` TRL uses log-probs averaged over the response tokens: callers
pass ``sequence_logps(..., average=True)`` for it (the training loop does).
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
METRIC_KEYS = (LOSS, REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_ACCURACIES, REWARDS_MARGINS, LOGPS_CHOSEN, LOGPS_REJECTED)
COUNT = "count"


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   average: bool = False) -> torch.Tensor:
    """Sum (or mean, ``average=True``) over each sequence of log p(label_t | tokens < t).

    logits ``[B, T, V]`` (any float dtype), labels ``[B, T]`` with ``ignore_index`` where no
    loss is taken. Position t's logits predict label t+1. Computed in fp32, one row at a
    time so at most one fp32 ``[T, V]`` slice is live. Returns ``[B]`` fp32.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    out = []
    for b in range(logits.shape[0]):
        row = logits[b].float()
        tok = row.gather(-1, safe[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
        out.append((tok * mask[b]).sum())
    total = torch.stack(out)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean next-token cross entropy in fp32. logits ``[B, T, V]``, labels ``[B, T]``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=ignore_index)


# -- DPO family: each takes logits = beta * (pi_logratio - ref_logratio) pieces ------------------


def _sigmoid(logits, beta, label_smoothing, **_):
    # TRL: -logsigmoid(beta*l)*(1-ls) - logsigmoid(-beta*l)*ls  (conservative DPO when ls > 0)
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust(logits, beta, label_smoothing, **_):
    # TRL: (-logsigmoid(beta*l)*(1-ls) + logsigmoid(-beta*l)*ls) / (1 - 2ls)
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)


def _hinge(logits, beta, **_):
    return torch.relu(1 - beta * logits)


def _ipo(logits, beta, **_):
    # TRL: (logits - 1/(2*beta))**2 with average log-probs (eq. 17 of the IPO paper)
    return (logits - 1 / (2 * beta)) ** 2


def _bco_pair(logits, beta, chosen_rewards, rejected_rewards, running_mean=0.0, **_):
    # TRL: delta = running mean of the rewards;
    # -logsigmoid(beta*chosen_logratio - delta) - logsigmoid(-(beta*rejected_logratio - delta))
    return -F.logsigmoid(chosen_rewards - running_mean) - F.logsigmoid(-(rejected_rewards - running_mean))


LOSS_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "bco_pair": _bco_pair,
}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             running_mean: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and rewards, all ``[B]``.

    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``; ``chosen_rewards = beta*(pi_c - ref_c)``,
    ``rejected_rewards = beta*(pi_r - ref_r)`` (detached). ``running_mean`` is bco_pair's δ.
    """
    fn = LOSS_FNS.get(loss_type)
    if fn is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(LOSS_FNS))}")
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    logits = chosen_logratio - rejected_logratio
    losses = fn(logits, beta=beta, label_smoothing=label_smoothing, chosen_rewards=beta * chosen_logratio,
                rejected_rewards=beta * rejected_logratio, running_mean=running_mean)
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


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
    """Divide every summed metric by ``count``."""
    n = float(sums[COUNT])
    if n <= 0:
        raise ValueError("no examples were counted")
    return {k: float(v) / n for k, v in sums.items() if k != COUNT}
