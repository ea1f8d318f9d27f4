"""DPO loss family and metrics against numbers worked out by hand."""

import math

import pytest
import torch

from raydpo.losses import dpo_loss, dpo_metric_sums, finalize_metrics, sequence_logps, sft_loss

t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def sig(x):
    return 1 / (1 + math.exp(-x))


# policy chosen -1, rejected -3; reference chosen -2, rejected -2
# chosen logratio = -1 - (-2) = 1, rejected logratio = -3 - (-2) = -1, logits = 1 - (-1) = 2
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_sigmoid_by_hand():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # -log sigma(0.1 * 2) = -log sigma(0.2) = 0.598139
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_label_smoothing_and_robust_by_hand():
    ls = 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=ls)
    # 0.9 * -log sigma(0.2) + 0.1 * -log sigma(-0.2) = 0.9*0.598139 + 0.1*0.798139 = 0.618139
    assert losses.item() == pytest.approx(0.618139, abs=1e-6)
    robust, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=ls)
    # (0.9*0.598139 - 0.1*0.798139) / 0.8 = (0.538325 - 0.079814) / 0.8 = 0.573139
    assert robust.item() == pytest.approx(0.573139, abs=1e-6)


def test_hinge_ipo_bco_by_hand():
    hinge, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.8)  # relu(1 - 0.1*2)
    ipo, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx(9.0)  # (2 - 1/(2*0.1))^2 = (2-5)^2
    bco, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="bco_pair", running_mean=0.05)
    # -log sigma(0.1 - 0.05) - log sigma(-(-0.1 - 0.05)) = -log sigma(0.05) - log sigma(0.15)
    expected = -math.log(sig(0.05)) - math.log(sig(0.15))
    assert bco.item() == pytest.approx(expected, abs=1e-6)


def test_step0_identity_policy_equals_reference():
    z = torch.randn(5)
    losses, cr, rr = dpo_loss(z, z - 1, z, z - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_unknown_loss_type_names_valid_ones():
    with pytest.raises(ValueError, match="bco_pair"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto_typo")


def test_sequence_logps_shift_and_mask_by_hand():
    # vocab 2; logits at position t predict label t+1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])  # [1, 3, 2]
    labels = torch.tensor([[-100, 0, 1]])
    # pos0 -> label 0 with uniform logits: log 1/2; pos1 -> label 1 with p = 1/(3+1): log 1/4
    out = sequence_logps(logits, labels)
    assert out.item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)
    masked = sequence_logps(logits, torch.tensor([[-100, -100, 1]]))
    assert masked.item() == pytest.approx(math.log(0.25), abs=1e-6)
    avg = sequence_logps(logits, labels, average=True)
    assert avg.item() == pytest.approx((math.log(0.5) + math.log(0.25)) / 2, abs=1e-6)
    assert sequence_logps(logits.bfloat16(), labels).dtype == torch.float32


def test_sft_loss_matches_sequence_logps():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    assert sft_loss(logits, labels).item() == pytest.approx(-(sequence_logps(logits, labels).sum() / 10).item(), abs=1e-5)


def _metrics(pc, pr, rc, rr):
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.2)
    return dpo_metric_sums(cr, rj, pc, pr, losses)


def test_metrics_by_hand():
    m = finalize_metrics(_metrics(t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)))
    # rewards chosen 0.2*1, 0.2*-2 -> mean -0.1; rejected 0.2*-1, 0 -> mean -0.1; acc: 0.2>-0.2 yes, -0.4>0 no
    assert m["rewards/chosen"] == pytest.approx(-0.1) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.0)  # (0.4 + -0.4)/2
    assert m["logps/chosen"] == pytest.approx(-2.5) and m["logps/rejected"] == pytest.approx(-2.5)


def test_per_rank_sums_combine_into_the_global_mean():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(7) for _ in range(4))
    whole = finalize_metrics(_metrics(pc, pr, rc, rr))
    a, b = _metrics(pc[:2], pr[:2], rc[:2], rr[:2]), _metrics(pc[2:], pr[2:], rc[2:], rr[2:])  # unequal ranks
    combined = finalize_metrics({k: a[k] + b[k] for k in a})
    for k, v in whole.items():
        assert combined[k] == pytest.approx(v, abs=1e-6), k
    # a naive mean of per-rank means would be wrong for unequal shards
    naive = (finalize_metrics(a)["loss"] + finalize_metrics(b)["loss"]) / 2
    assert abs(naive - whole["loss"]) > 1e-4


def test_grad_accumulation_of_equal_micro_batches_matches_full_batch():
    torch.manual_seed(2)
    w = torch.randn(8, requires_grad=True)
    ref = torch.randn(8)
    full = dpo_loss(w, -w, ref, -ref)[0].mean()
    (g_full,) = torch.autograd.grad(full, w)
    micro = sum(dpo_loss(w[i:i + 2], -w[i:i + 2], ref[i:i + 2], -ref[i:i + 2])[0].mean() for i in range(0, 8, 2)) / 4
    (g_micro,) = torch.autograd.grad(micro, w)
    assert micro.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(g_full, g_micro, atol=1e-6)
