"""The DPO-family loss names and what each one reads: the one home of these rules.

Torch-free, so the config validates a loss name without importing torch; `raydpo.losses`
(whose table ``LOSS_FNS`` has one function per name here), the config and the training loop
all ask this module.
"""

from __future__ import annotations

from collections.abc import Sequence

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "bco_pair", "exo_pair", "nca_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo")
# no reference log-probs read: a loss made only of these needs no reference forward or pass
REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})
# not a preference loss: left out of the step-0 expected value, and never a DPO loss on its own
NLL_ONLY = frozenset({"sft"})
# the losses that read ``label_smoothing``
LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")


def _names(loss_type: str | Sequence[str]) -> set[str]:
    return {loss_type} if isinstance(loss_type, str) else set(loss_type)


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """False when every term is reference-free: no reference forward, pass or cache at all."""
    return not _names(loss_type) <= REFERENCE_FREE


def reads_chosen_nll(loss_type: str | Sequence[str], cpo_alpha: float = 0.0) -> bool:
    """Whether the loss has a chosen-NLL term (``sft``, ``orpo``, ``simpo`` with ``cpo_alpha``)."""
    types = _names(loss_type)
    return bool(types & {"sft", "orpo"}) or ("simpo" in types and bool(cpo_alpha))


def step0_skip_reason(loss_type: str | Sequence[str]) -> str | None:
    """Why the DPO step-0 sanity check cannot apply to this loss, or None when it does: a
    reference-free preference term's step-0 value depends on the base model's log-probs."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    free = [t for t in names if t in REFERENCE_FREE - NLL_ONLY]
    if free:
        return (f"{'/'.join(dict.fromkeys(free))} is reference-free: its step-0 loss depends on the base model's "
                "log-probs, not a zero margin (it is not ln 2), so there is nothing to check it against")
    return None
