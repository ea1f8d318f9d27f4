"""Pure loss maths: sequence log-probs, the DPO loss family (as TRL 1.16 defines it), SFT loss,
and reward metrics as *sums* so ranks can all-reduce before dividing.

Conventions: per-example tensors are ``[B]``; log-probs are fp32 **sums** over the response
tokens (`sequence_logps`); rewards are ``beta * (policy - reference)`` log-probs, detached —
except for a loss made only of reference-free terms (``simpo``, ``orpo``, ``sft``:
`raydpo.loss_names.REFERENCE_FREE`), whose rewards are ``beta * mean log-prob`` as TRL's CPO and ORPO trainers log
them. The loss family is a table (`LOSS_FNS`, name -> per-example function); ``loss_type`` may be
one name or a list whose terms `dpo_loss` adds with ``loss_weights``, as TRL 1.16 combines them.

Length normalisation. TRL 1.16 (``DPOTrainer._compute_loss``) feeds IPO and ``sigmoid_norm`` the
*per-token average* log-ratio: ``delta = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r`` with ``n`` the
number of response tokens (``clamp(min=1)``; the scored labels here, the same count whenever a
prompt precedes the response), while rewards and ``logps/*`` metrics stay on the sums; SimPO and
ORPO score averaged log-probs too. Two ways to get it here:

* exact TRL parity, metrics included: pass summed log-probs plus ``chosen_lengths`` /
  ``rejected_lengths`` (``sequence_logps(..., return_count=True)`` gives them);
* or pass averaged log-probs (``sequence_logps(..., average=True)``) for policy *and* reference
  and no lengths: the loss is identical (policy and reference share the token mask), but
  rewards and ``logps/*`` are then per-token averages. The NLL terms (``sft``, ``orpo``,
  ``simpo`` with ``cpo_alpha``) are token means over the batch and need the lengths.

Deliberate notes against TRL 1.16:

* ``sigmoid`` keeps conservative DPO (cDPO): with ``label_smoothing = ε`` the loss is
  ``-(1-ε)·logσ(βz) - ε·logσ(-βz)``, as TRL < 1.0 defined it. TRL 1.16 ignores label smoothing
  for ``sigmoid`` (it uses it in ``robust``, ``exo_pair``, ``aot``, ``aot_unpaired``); at
  ``ε = 0`` — the default — the two are identical. We keep it rather than silently dropping a
  value the user set.
* ``bco_pair`` in TRL 1.16 has no running mean: ``-logσ(r_c) - logσ(-r_r)``. Older TRL
  subtracted a running mean δ of the rewards; ``running_mean=δ`` reproduces that, and the
  default ``0.0`` is exactly TRL 1.16. Keeping δ up to date is the caller's job (this module
  holds no state).
* ``orpo``'s NLL is over the chosen *response* tokens, like ``sft`` and SimPO's ``cpo_alpha``
  term (and the ORPO paper's L_SFT); TRL 1.16's ORPOTrainer also counts the prompt tokens. The
  odds-ratio term is TRL's exactly.

Imports nothing but torch (and the metric names of `raydpo.metric_names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from raydpo.loss_names import REFERENCE_FREE
from raydpo.metric_names import (LOGPS_CHOSEN, LOGPS_REJECTED, LOSS, NLL_LOSS, REWARDS_ACCURACIES, REWARDS_CHOSEN,
                                 REWARDS_MARGINS, REWARDS_REJECTED)

COUNT = "count"  # the divisor summed beside the metrics; never logged


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 ``log p(target)`` per position: logits ``[B, S, V]`` (any float dtype), targets
    ``[B, S]`` -> ``[B, S]``, as ``logit[target] - logsumexp(logits)``, one row at a time, so
    without grad at most one fp32 ``[S, V]`` row is live and never a full ``log_softmax``
    beside the logits. The one rule for a token's log-prob: `sequence_logps` and
    `raydpo.models.pairs.pair_logps` both use it."""
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


# -- DPO family: a table of per-example loss functions -----------------------------------------
#
# Each takes keyword pieces (z = (pi_c - ref_c) - (pi_r - ref_r) unscaled, the log-ratios, the
# policy and reference sums, the lengths, the hyper-parameters) and ignores the rest (``**_``).
# Each returns ``[B]`` per-example losses; `dpo_loss` adds them up with their weights.


def _avg(x, n):
    """Per-token average of summed log-probs; without lengths the caller already averaged."""
    return x if n is None else x / n.float().clamp(min=1)


def _csigmoid(x, beta, eps):
    # conservative DPO: -(1-ε)·logσ(βx) - ε·logσ(-βx)
    return -F.logsigmoid(beta * x) * (1 - eps) - F.logsigmoid(-beta * x) * eps


def _sigmoid(z, beta, label_smoothing, **_):
    # cDPO; label_smoothing = 0 is TRL 1.16's sigmoid
    return _csigmoid(z, beta, label_smoothing)


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
        z = _avg(chosen_logratio, chosen_lengths) - _avg(rejected_logratio, rejected_lengths)
    return (z - 1 / (2 * beta)) ** 2


def _bco_pair(z, beta, chosen_rewards, rejected_rewards, running_mean=0.0, **_):
    # δ = 0 is TRL 1.16; older TRL subtracted a running mean of the rewards
    return -F.logsigmoid(chosen_rewards - running_mean) - F.logsigmoid(-(rejected_rewards - running_mean))


def _exo_pair(z, beta, label_smoothing, **_):
    # TRL 1.16 (EXO-pref, eq. 16): KL(q || p) over {chosen, rejected}, q = σ(±βz), p = (1-ε, ε)
    eps = label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {eps}")
    return (torch.sigmoid(beta * z) * (F.logsigmoid(beta * z) - math.log1p(-eps))
            + torch.sigmoid(-beta * z) * (F.logsigmoid(-beta * z) - math.log(eps)))


def _nca_pair(z, beta, chosen_rewards, rejected_rewards, **_):
    # TRL 1.16: -logσ(r_c) - ½·logσ(-r_c) - ½·logσ(-r_r)
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def _sppo_hard(z, beta, chosen_logratio, rejected_logratio, **_):
    # TRL 1.16: (log-ratio_c - 1/(2β))² + (log-ratio_r + 1/(2β))²
    return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2


def _aot(z, beta, label_smoothing, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
         ref_rejected_logps, **_):
    # TRL 1.16: cDPO on sorted(pi_c - pi_r) - sorted(ref_c - ref_r), sorted over the micro-batch
    # (so entry i is not pair i's loss; only the mean means anything)
    delta = (torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)[0]
             - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0])
    return _csigmoid(delta, beta, label_smoothing)


def _aot_unpaired(z, beta, label_smoothing, chosen_logratio, rejected_logratio, **_):
    # TRL 1.16: cDPO on sorted(log-ratio_c) - sorted(log-ratio_r), sorted over the micro-batch
    delta = torch.sort(chosen_logratio, dim=0)[0] - torch.sort(rejected_logratio, dim=0)[0]
    return _csigmoid(delta, beta, label_smoothing)


def _apo_zero(z, beta, chosen_logratio, rejected_logratio, **_):
    # TRL 1.16 (APO eq. 7): 1 - σ(β·log-ratio_c) + σ(β·log-ratio_r)
    return 1 - torch.sigmoid(beta * chosen_logratio) + torch.sigmoid(beta * rejected_logratio)


def _apo_down(z, beta, chosen_logratio, **_):
    # TRL 1.16 (APO eq. 8): σ(β·log-ratio_c) + 1 - σ(βz)
    return torch.sigmoid(beta * chosen_logratio) + 1 - torch.sigmoid(beta * z)


def _discopop(z, beta, discopop_tau=0.05, **_):
    # TRL 1.16 (DiscoPOP eq. 5): blend of -logσ(βz) and exp(-βz) by σ(βz/τ)
    x = beta * z
    m = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def _sigmoid_norm(z, beta, chosen_logratio, rejected_logratio, chosen_lengths=None, rejected_lengths=None, **_):
    # TRL 1.16: -logσ(β·z̄), z̄ on per-token average log-ratios (as ipo); no label smoothing
    return -F.logsigmoid(beta * (_avg(chosen_logratio, chosen_lengths) - _avg(rejected_logratio, rejected_lengths)))


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen responses' token-mean NLL over the micro-batch, ``-Σ pi_c / Σ n_c``, repeated
    to ``[B]`` (TRL 1.16's ``sft`` term and CPO's ``nll_loss``: one cross entropy over every
    scored chosen token of the batch, so its mean over the ``[B]`` entries is that value)."""
    nll = -policy_chosen_logps.float().sum() / chosen_lengths.sum().float().clamp(min=1)
    return nll.expand(policy_chosen_logps.shape)


def _sft(z, beta, policy_chosen_logps, chosen_lengths=None, **_):
    if chosen_lengths is None:
        raise ValueError("sft needs chosen_lengths (its NLL is a mean over the chosen tokens)")
    return chosen_nll(policy_chosen_logps, chosen_lengths)


def _simpo(z, beta, label_smoothing, policy_chosen_logps, policy_rejected_logps, chosen_lengths=None,
           rejected_lengths=None, simpo_gamma=0.5, cpo_alpha=0.0, **_):
    # TRL 1.16 CPOTrainer(loss_type="simpo"): logits = (avg_c - avg_r) - γ/β, then cDPO on β·logits,
    # plus cpo_alpha × the chosen NLL; reference-free
    logits = _avg(policy_chosen_logps, chosen_lengths) - _avg(policy_rejected_logps, rejected_lengths) - simpo_gamma / beta
    out = _csigmoid(logits, beta, label_smoothing)
    if cpo_alpha:
        if chosen_lengths is None:
            raise ValueError("simpo with cpo_alpha > 0 needs chosen_lengths (its NLL is a mean over the chosen tokens)")
        out = out + cpo_alpha * chosen_nll(policy_chosen_logps, chosen_lengths)
    return out


def _log1mexp(x):
    # log(1 - exp(x)) for x <= 0, branching at -ln 2 against cancellation (TRL 1.16's log1mexp)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(z, beta, policy_chosen_logps, policy_rejected_logps, chosen_lengths=None, rejected_lengths=None, **_):
    # TRL 1.16 ORPOTrainer: NLL(chosen) - β·logσ(log-odds) on averaged log-probs; reference-free
    if chosen_lengths is None:
        raise ValueError("orpo needs chosen_lengths and rejected_lengths (averaged log-probs and the chosen NLL)")
    avg_c, avg_r = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    return chosen_nll(policy_chosen_logps, chosen_lengths) - beta * F.logsigmoid(log_odds)


LOSS_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "bco_pair": _bco_pair,
    "exo_pair": _exo_pair, "nca_pair": _nca_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm, "sft": _sft, "simpo": _simpo, "orpo": _orpo,
}


def loss_list(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None
              ) -> list[tuple[str, float]]:
    """``[(name, weight), ...]`` from one name or a list and optional weights (default 1 each);
    unknown names or a weight count that does not match raise ValueError."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list")
    unknown = [t for t in types if t not in LOSS_FNS]
    if unknown:
        raise ValueError(f"unknown loss_type {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(LOSS_FNS))}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"{len(weights)} loss_weights for {len(types)} loss types {types}")
    return list(zip(types, weights))


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
             running_mean: float | torch.Tensor = 0.0, *, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, loss_weights: Sequence[float] | None = None,
             simpo_gamma: float = 0.5, cpo_alpha: float = 0.0, discopop_tau: float = 0.05,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and rewards, all ``[B]`` fp32.

    ``loss_type`` is one name or a list (TRL 1.16's combination): the loss is
    ``Σ w_i · loss_i`` with ``loss_weights`` (default 1 each). ``z = (pi_c - ref_c) - (pi_r -
    ref_r)``, log-ratios ``ρ_c = pi_c - ref_c``, ``ρ_r = pi_r - ref_r``; σ = sigmoid, ε =
    ``label_smoothing``, r = β·ρ, ``cdpo(x) = -(1-ε)·logσ(βx) - ε·logσ(-βx)``, a bar = the
    per-token average (sum / n with the lengths, or inputs already averaged without them):

    * ``sigmoid``      ``cdpo(z)`` (cDPO; ε = 0 is TRL 1.16)
    * ``robust``       ``(-(1-ε)·logσ(βz) + ε·logσ(-βz)) / (1-2ε)``, ε < 0.5
    * ``hinge``        ``relu(1 - βz)``
    * ``ipo``          ``(z̄ - 1/(2β))²``
    * ``bco_pair``     ``-logσ(r_c - δ) - logσ(-(r_r - δ))``, δ = ``running_mean`` (a pure
      function: the caller keeps the running mean; the default 0.0 is exactly TRL 1.16)
    * ``exo_pair``     ``σ(βz)·(logσ(βz) - log(1-ε)) + σ(-βz)·(logσ(-βz) - log ε)``, 0 < ε < 1
    * ``nca_pair``     ``-logσ(r_c) - ½·logσ(-r_c) - ½·logσ(-r_r)``
    * ``sppo_hard``    ``(ρ_c - 1/(2β))² + (ρ_r + 1/(2β))²``
    * ``aot``          ``cdpo(sort(pi_c - pi_r) - sort(ref_c - ref_r))``, sorted over the batch
    * ``aot_unpaired`` ``cdpo(sort(ρ_c) - sort(ρ_r))``
    * ``apo_zero``     ``1 - σ(βρ_c) + σ(βρ_r)``
    * ``apo_down``     ``σ(βρ_c) + 1 - σ(βz)``
    * ``discopop``     ``-logσ(βz)·(1-m) + exp(-βz)·m``, ``m = σ(βz/τ)``, τ = ``discopop_tau``
    * ``sigmoid_norm`` ``-logσ(β·z̄)``
    * ``sft``          ``-Σ pi_c / Σ n_c`` over the batch (`chosen_nll`), no reference
    * ``simpo``        ``cdpo(p̄_c - p̄_r - γ/β) + α·NLL`` on the policy alone, γ =
      ``simpo_gamma``, α = ``cpo_alpha``
    * ``orpo``         ``NLL - β·logσ((p̄_c - p̄_r) - (log(1-e^p̄_c) - log(1-e^p̄_r)))``, no reference

    ``sft``, ``orpo`` and ``simpo`` with ``cpo_alpha`` need the lengths. Rewards: ``β·ρ``
    (detached) whenever a term reads the reference; for a loss made only of reference-free terms
    (`REFERENCE_FREE`) ``β·p̄`` as TRL's CPO/ORPO trainers log them (the reference inputs are
    then ignored: pass zeros). Unknown names or a ``loss_weights`` length that does not match
    raise ValueError. Works on any ``[B]``, including the 1-element zeros of the step-0 check.
    """
    terms = loss_list(loss_type, loss_weights)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
    kw = dict(z=chosen_logratio - rejected_logratio, beta=beta, label_smoothing=label_smoothing,
              chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
              chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, running_mean=running_mean,
              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
              policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
              simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, discopop_tau=discopop_tau)
    losses = sum(w * LOSS_FNS[name](**kw) for name, w in terms)
    if all(name in REFERENCE_FREE for name, _ in terms):
        chosen_rewards = beta * _avg(pc, chosen_lengths)
        rejected_rewards = beta * _avg(pr, rejected_lengths)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    losses: torch.Tensor, nll: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """0-dim sums of every metric plus ``count``: add across micro-batches and ranks, then
    `finalize_metrics` — the result is the global mean, whatever the split. With ``nll`` (the
    ``[B]`` `chosen_nll` of a loss that has that term) also ``nll_loss``."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    extra = {} if nll is None else {NLL_LOSS: nll.detach().float().sum()}
    return {
        **extra,
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
