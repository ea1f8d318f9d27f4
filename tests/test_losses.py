"""DPO loss family and metrics against numbers worked out by hand."""

import math

import pytest
import torch

from raydpo.loss_names import reads_chosen_nll
from raydpo.losses import (LOSS_FNS, chosen_nll, dpo_loss, dpo_metric_sums, finalize_metrics, sequence_logps,
                           sft_loss)
from raydpo.metric_names import METRIC_KEYS

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
    #   = 0.668460 + 0.620957 = 1.289417
    expected = -math.log(sig(0.05)) - math.log(sig(0.15))
    assert bco.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(1.289417, abs=1e-6)
    # the running mean may be a 0-dim tensor (the loop keeps it on device)
    assert dpo_loss(PC, PR, RC, RR, loss_type="bco_pair", running_mean=torch.tensor(0.05))[0].item() == pytest.approx(expected)


def test_ipo_with_lengths_is_trl_1_16_by_hand():
    # summed log-probs: policy chosen -2 / ref -4 over 2 tokens -> per-token log-ratio (−2+4)/2 = 1
    #                   policy rejected -6 / ref -3 over 3 tokens -> (−6+3)/3 = −1
    # z̄ = 1 − (−1) = 2; beta 0.1: (2 − 1/0.2)^2 = (2 − 5)^2 = 9
    losses, cr, rr = dpo_loss(t(-2.0), t(-6.0), t(-4.0), t(-3.0), beta=0.1, loss_type="ipo",
                              chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    assert losses.item() == pytest.approx(9.0)
    # rewards stay on the sums, as in TRL: 0.1 * 2 and 0.1 * -3
    assert cr.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.3)
    # the same loss from log-probs the caller averaged: policy -1, -2; ref -2, -1
    averaged, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-2.0), t(-1.0), beta=0.1, loss_type="ipo")
    assert averaged.item() == pytest.approx(9.0)
    # a zero length is clamped to 1 (TRL's clamp(min=1)): z̄ = 2/1 − (−3)/3 = 3 -> (3 − 5)^2 = 4
    zero, _, _ = dpo_loss(t(-2.0), t(-6.0), t(-4.0), t(-3.0), beta=0.1, loss_type="ipo",
                          chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([3]))
    assert zero.item() == pytest.approx(4.0)


def test_lengths_are_read_by_ipo_only_and_must_come_in_pairs():
    n = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    for lt in ("sigmoid", "hinge", "robust", "bco_pair"):
        assert torch.equal(dpo_loss(PC, PR, RC, RR, loss_type=lt)[0], dpo_loss(PC, PR, RC, RR, loss_type=lt, **n)[0])
    with pytest.raises(ValueError, match="both"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", chosen_lengths=torch.tensor([2]))


def test_robust_rejects_label_smoothing_of_one_half():
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)  # 1 − 2ε = 0


def test_ipo_pipeline_from_logits_matches_trl_definition():
    # sequence_logps(return_count=True) feeds dpo_loss's lengths; equals averaging in sequence_logps
    torch.manual_seed(4)
    pol, ref = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    labels[:, :2] = -100
    labels[1, 4:] = -100  # chosen rows 0-1, rejected rows 2-3, unequal lengths
    (p, n), r = sequence_logps(pol, labels, return_count=True), sequence_logps(ref, labels)
    exact = dpo_loss(p[:2], p[2:], r[:2], r[2:], loss_type="ipo", chosen_lengths=n[:2], rejected_lengths=n[2:])[0]
    pa, ra = sequence_logps(pol, labels, average=True), sequence_logps(ref, labels, average=True)
    assert torch.allclose(exact, dpo_loss(pa[:2], pa[2:], ra[:2], ra[2:], loss_type="ipo")[0], atol=1e-5)


def test_bco_pair_without_running_mean_is_trl_1_16():
    bco, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="bco_pair")
    # TRL 1.16: -log sigma(r_c) - log sigma(-r_r) = -log sigma(0.1) - log sigma(0.1) = 2 * 0.644397 = 1.288793
    assert bco.item() == pytest.approx(1.288793, abs=1e-6)


def test_loss_types_ignore_running_mean_except_bco_pair():
    for lt in ("sigmoid", "hinge", "ipo", "robust"):
        a = dpo_loss(PC, PR, RC, RR, loss_type=lt)[0]
        b = dpo_loss(PC, PR, RC, RR, loss_type=lt, running_mean=3.0)[0]
        assert torch.equal(a, b), lt


@pytest.mark.parametrize(("loss_type", "ls", "expected"), [
    ("sigmoid", 0.0, math.log(2)),  # -log sigma(0)
    ("sigmoid", 0.1, math.log(2)),  # 0.9 ln2 + 0.1 ln2
    ("robust", 0.1, math.log(2)),  # (0.9 ln2 - 0.1 ln2) / 0.8 = ln2
    ("hinge", 0.0, 1.0),  # relu(1 - 0)
    ("ipo", 0.0, 25.0),  # (0 - 1/(2*0.1))^2 = 5^2
    ("bco_pair", 0.0, 2 * math.log(2)),  # -log sigma(0) - log sigma(0)
])
def test_step0_expected_loss_on_one_element_zeros(loss_type, ls, expected):
    # exactly what train.loop.sanity_check computes
    z = torch.zeros(1)
    losses, cr, rr = dpo_loss(z, z, z, z, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert cr.item() == 0 and rr.item() == 0


def test_rewards_are_detached_and_loss_has_grad():
    pc = PC.clone().requires_grad_()
    losses, cr, rr = dpo_loss(pc, PR, RC, RR)
    assert losses.requires_grad and not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    # d/dpc of -log sigma(0.1 * z), z = 2: -0.1 * (1 - sigma(0.2)) = -0.1 * 0.450166 = -0.0450166
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)


def test_step0_identity_policy_equals_reference():
    z = torch.randn(5)
    losses, cr, rr = dpo_loss(z, z - 1, z, z - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_unknown_loss_type_names_valid_ones():
    with pytest.raises(ValueError, match="kto_typo") as e:
        dpo_loss(PC, PR, RC, RR, loss_type="kto_typo")
    for name in ("sigmoid", "hinge", "ipo", "robust", "bco_pair"):
        assert name in str(e.value)
    assert set(LOSS_FNS) >= {"sigmoid", "hinge", "ipo", "robust", "bco_pair"}


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
    total, count = sequence_logps(logits, labels, return_count=True)
    assert count.tolist() == [2] and total.item() == pytest.approx(out.item())
    assert sequence_logps(logits, torch.tensor([[-100, -100, 1]]), return_count=True)[1].tolist() == [1]


def test_sequence_logps_batch_rows_are_independent_and_fully_masked_row_is_zero():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[-100, 0, 1], [-100, -100, -100]])
    out = sequence_logps(logits, labels)
    assert out[0].item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)
    assert out[1].item() == 0.0  # no label tokens: sum 0, average 0 (no NaN)
    assert sequence_logps(logits, labels, average=True)[1].item() == 0.0
    # the label at position 0 is never scored (nothing predicts it)
    first = sequence_logps(logits, torch.tensor([[1, 0, 1]] * 2))
    assert torch.equal(first, sequence_logps(logits, labels[:1].repeat(2, 1)))


def test_sequence_logps_matches_log_softmax_and_gradients_flow():
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 7))
    labels[0, :3] = -100
    out = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (lp * (labels[:, 1:] != -100)).sum(-1)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(torch.zeros(1, 3, 2), torch.zeros(1, 4, dtype=torch.long))


def test_sft_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])
    # scored: pos0 -> label 0 (p 1/2), pos1 -> label 1 (p 1/4); mean of -log: (ln2 + ln4) / 2 = 1.039721
    assert sft_loss(logits, torch.tensor([[5, 0, 1]])).item() == pytest.approx(1.039721, abs=1e-6)
    # -100 is ignored in the token mean: only pos1 -> ln4 = 1.386294
    assert sft_loss(logits, torch.tensor([[5, -100, 1]])).item() == pytest.approx(1.386294, abs=1e-6)
    assert sft_loss(logits.bfloat16(), torch.tensor([[5, 0, 1]])).dtype == torch.float32


def test_sft_loss_matches_sequence_logps():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    per_token = -(sequence_logps(logits, labels).sum() / 10).item()  # 2 rows x 5 scored tokens
    assert sft_loss(logits, labels).item() == pytest.approx(per_token, abs=1e-5)


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


def test_metric_sums_keys_and_count():
    sums = _metrics(t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0))
    assert set(sums) == {*METRIC_KEYS, "count"}
    assert all(v.dim() == 0 for v in sums.values())
    assert sums["count"].item() == 2 and sums["rewards/accuracies"].item() == 1  # a count, not a mean
    # loss sum by hand: z = 2 -> -log sigma(0.4) = 0.513015; z = -2 -> -log sigma(-0.4) = 0.913015
    assert sums["loss"].item() == pytest.approx(1.426030, abs=1e-5)


def test_finalize_is_generic_and_accepts_floats():
    # the SFT loop passes only loss and count
    assert finalize_metrics({"loss": torch.tensor(6.0), "count": torch.tensor(4.0)}) == {"loss": 1.5}
    assert finalize_metrics({"loss": 3.0, "count": 2}) == {"loss": 1.5}
    with pytest.raises(ValueError):
        finalize_metrics({"loss": 0.0, "count": 0})


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


# -- the types added to match TRL 1.16's list (trl/trainer/dpo_trainer.py `_compute_loss`; CPO, ORPO) --
# With PC, PR, RC, RR and beta 0.1: log-ratios ρ_c = 1, ρ_r = -1, z = 2, rewards r_c = 0.1, r_r = -0.1.


@pytest.mark.parametrize(("loss_type", "kw", "expected"), [
    # σ(0.2)·(logσ(0.2) - log(1-ε)) + σ(-0.2)·(logσ(-0.2) - log ε), ε = 1e-3:
    # 0.549834·(-0.598139 + 0.0010005) + 0.450166·(-0.798139 + 6.907755) = -0.328327 + 2.750342
    ("exo_pair", {"label_smoothing": 1e-3}, 2.422015),
    # -logσ(0.1) - ½·logσ(-0.1) - ½·logσ(0.1) = 0.644397 + 0.372198 + 0.322198
    ("nca_pair", {}, 1.338793),
    # (ρ_c - 1/(2β))² + (ρ_r + 1/(2β))² = (1 - 5)² + (-1 + 5)²
    ("sppo_hard", {}, 32.0),
    # 1 - σ(0.1) + σ(-0.1) = 1 - 0.524979 + 0.475021
    ("apo_zero", {}, 0.950042),
    # σ(0.1) + 1 - σ(0.2) = 0.524979 + 1 - 0.549834
    ("apo_down", {}, 0.975145),
    # m = σ(0.2/0.05) = σ(4) = 0.982014: 0.598139·(1 - m) + exp(-0.2)·m = 0.010758 + 0.804005
    ("discopop", {}, 0.814763),
    # τ = 1: m = σ(0.2) = 0.549834: 0.598139·0.450166 + 0.818731·0.549834 = 0.269262 + 0.450166
    ("discopop", {"discopop_tau": 1.0}, 0.719428),
])
def test_trl_loss_types_by_hand(loss_type, kw, expected):
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, **kw)
    assert losses.item() == pytest.approx(expected, abs=1e-5)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)  # β·log-ratio, as TRL


def test_aot_sorts_over_the_batch_by_hand():
    # policy 0, 0 / 0, 0; reference chosen -1, -3, rejected -2, -1
    pc, pr, rc, rr = t(0.0, 0.0), t(0.0, 0.0), t(-1.0, -3.0), t(-2.0, -1.0)
    # aot: sort(pi_c - pi_r) = [0, 0]; sort(ref_c - ref_r) = sort([1, -2]) = [-2, 1]; Δ = [2, -1]
    # -logσ(0.2) = 0.598139, -logσ(-0.1) = 0.744397 (paired, sigmoid would see z = [-1, 2])
    aot, cr, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot")
    assert aot.tolist() == pytest.approx([0.598139, 0.744397], abs=1e-5)
    assert cr.tolist() == pytest.approx([0.1, 0.3])  # rewards stay paired: 0.1·ρ_c
    # cDPO with ε = 0.1 on Δ = 2: 0.9·0.598139 + 0.1·0.798139 = 0.618139
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot", label_smoothing=0.1)[0][0].item() == pytest.approx(
        0.618139, abs=1e-5)
    # aot_unpaired: ρ_c = [1, 3], ρ_r = [2, 1]; sort: [1, 3] - [1, 2] = [0, 1] -> ln 2, -logσ(0.1)
    unp, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot_unpaired")
    assert unp.tolist() == pytest.approx([0.693147, 0.644397], abs=1e-5)


def test_sigmoid_norm_with_lengths_by_hand():
    # the IPO example above: per-token log-ratios 1 and -1, z̄ = 2 -> -logσ(0.2) = 0.598139
    n = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    losses, cr, rr = dpo_loss(t(-2.0), t(-6.0), t(-4.0), t(-3.0), beta=0.1, loss_type="sigmoid_norm", **n)
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert cr.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.3)  # on the sums
    # on the sums it would be z = 2 - (-3) = 5 -> -logσ(0.5) = 0.474077; averaged inputs, no lengths: 0.598139
    assert dpo_loss(t(-1.0), t(-2.0), t(-2.0), t(-1.0), beta=0.1, loss_type="sigmoid_norm")[0].item() == pytest.approx(
        0.598139, abs=1e-6)


def test_sft_is_the_batch_token_mean_nll_of_chosen():
    # chosen sums -4 over 2 tokens and -6 over 4: TRL's sft = -(−4 − 6) / (2 + 4) = 1.666667 for every
    # pair (a mean of per-pair means would be (2 + 1.5) / 2 = 1.75); rejected and reference unused
    n = dict(chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([1, 1]))
    losses, cr, rr = dpo_loss(t(-4.0, -6.0), t(-1.0, -1.0), t(9.0, 9.0), t(9.0, 9.0), beta=0.1, loss_type="sft", **n)
    assert losses.tolist() == pytest.approx([1.666667, 1.666667], abs=1e-6)
    assert cr.tolist() == pytest.approx([-0.2, -0.15])  # reference-free: β·mean log-prob, -4/2 and -6/4
    assert chosen_nll(t(-4.0, -6.0), torch.tensor([2, 4])).tolist() == pytest.approx([1.666667] * 2, abs=1e-6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="sft")


def test_simpo_is_trl_cpo_simpo_by_hand():
    # chosen -4 over 2 tokens (mean -2), rejected -9 over 3 (mean -3); beta 2, gamma 0.5:
    # logits = (-2 - -3) - 0.5/2 = 0.75; β·logits = 1.5; -logσ(1.5) = 0.201413. Reference ignored.
    n = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    ref = t(123.0)
    losses, cr, rr = dpo_loss(t(-4.0), t(-9.0), ref, ref, beta=2.0, loss_type="simpo", **n)
    assert losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert cr.item() == pytest.approx(-4.0) and rr.item() == pytest.approx(-6.0)  # β·mean log-prob, as CPOTrainer
    # label smoothing ε = 0.1 (CPO's cDPO form): 0.9·0.201413 + 0.1·(-logσ(-1.5) = 1.701413) = 0.351413
    smooth = dpo_loss(t(-4.0), t(-9.0), ref, ref, beta=2.0, loss_type="simpo", label_smoothing=0.1, **n)[0]
    assert smooth.item() == pytest.approx(0.351413, abs=1e-6)
    # cpo_alpha 0.5 adds 0.5 × NLL(chosen) = 0.5 × 4/2 = 1.0
    alpha = dpo_loss(t(-4.0), t(-9.0), ref, ref, beta=2.0, loss_type="simpo", cpo_alpha=0.5, **n)[0]
    assert alpha.item() == pytest.approx(1.201413, abs=1e-6)
    # gamma 0: logits 1, β·logits = 2: -logσ(2) = 0.126928
    g0 = dpo_loss(t(-4.0), t(-9.0), ref, ref, beta=2.0, loss_type="simpo", simpo_gamma=0.0, **n)[0]
    assert g0.item() == pytest.approx(0.126928, abs=1e-6)


def test_orpo_is_trl_odds_ratio_loss_by_hand():
    # chosen sums -2, -1 over 2 tokens (means -1, -0.5); rejected -6 over 3, -3 over 2 (means -2, -1.5)
    # log(1 - e^x): x = -1: -0.458675, -2: -0.145413, -0.5: -0.932752 (the expm1 branch), -1.5: -0.252482
    # log-odds: (−1 + 2) − (−0.458675 + 0.145413) = 1.313262; (−0.5 + 1.5) − (−0.932752 + 0.252482) = 1.680270
    # logσ: −0.238183, −0.170859; NLL = (2 + 1) / (2 + 2) = 0.75; loss = 0.75 − 0.1·logσ
    n = dict(chosen_lengths=torch.tensor([2, 2]), rejected_lengths=torch.tensor([3, 2]))
    z = torch.zeros(2)
    losses, cr, rr = dpo_loss(t(-2.0, -1.0), t(-6.0, -3.0), z, z, beta=0.1, loss_type="orpo", **n)
    assert losses.tolist() == pytest.approx([0.773818, 0.767086], abs=1e-5)
    assert cr.tolist() == pytest.approx([-0.1, -0.05]) and rr.tolist() == pytest.approx([-0.2, -0.15])
    with pytest.raises(ValueError, match="orpo needs"):
        dpo_loss(PC, PR, RC, RR, loss_type="orpo")


def test_orpo_has_gradient_through_both_terms():
    pc = t(-2.0).requires_grad_()
    loss = dpo_loss(pc, t(-6.0), t(0.0), t(0.0), beta=0.1, loss_type="orpo",
                    chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))[0]
    loss.sum().backward()
    assert pc.grad.item() < -0.5  # NLL alone gives -1/2; the odds term pushes the same way


def test_weighted_list_is_the_weighted_sum():
    n = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([2]))
    # 1·sigmoid + 0.5·hinge + 2·sft = 0.598139 + 0.5·relu(1 − 0.2) + 2·(1/2) = 0.598139 + 0.4 + 1.0
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=["sigmoid", "hinge", "sft"],
                              loss_weights=[1.0, 0.5, 2.0], **n)
    assert losses.item() == pytest.approx(1.998139, abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)  # a reference term: β·log-ratio
    # no weights: 1 each; a one-element list is the single type
    assert dpo_loss(PC, PR, RC, RR, loss_type=["sigmoid", "hinge"])[0].item() == pytest.approx(0.598139 + 0.8, abs=1e-6)
    assert torch.equal(dpo_loss(PC, PR, RC, RR, loss_type=["ipo"])[0], dpo_loss(PC, PR, RC, RR, loss_type="ipo")[0])
    # simpo + sft: reference-free, rewards β·mean (chosen -1/2, rejected -3/2)
    _, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=["simpo", "sft"], **n)
    assert cr.item() == pytest.approx(-0.05) and rr.item() == pytest.approx(-0.15)


def test_list_validation():
    with pytest.raises(ValueError, match="'nope'"):
        dpo_loss(PC, PR, RC, RR, loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="2 loss_weights for 3"):
        dpo_loss(PC, PR, RC, RR, loss_type=["sigmoid", "hinge", "ipo"], loss_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(PC, PR, RC, RR, loss_type=[])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="exo_pair")  # log ε at ε = 0


@pytest.mark.parametrize(("loss_type", "kw", "expected"), [
    ("exo_pair", {"label_smoothing": 1e-3}, 2.761231),  # ½(−ln2 − log(1−ε)) + ½(−ln2 − log ε)
    ("nca_pair", {}, 2 * math.log(2)),  # −logσ(0) − ½logσ(0) − ½logσ(0)
    ("sppo_hard", {}, 50.0),  # (0 − 5)² + (0 + 5)²
    ("aot", {}, math.log(2)), ("aot_unpaired", {}, math.log(2)), ("sigmoid_norm", {}, math.log(2)),
    ("apo_zero", {}, 1.0),  # 1 − ½ + ½
    ("apo_down", {}, 1.0),  # ½ + 1 − ½
    ("discopop", {}, 0.5 * math.log(2) + 0.5),  # m = σ(0) = ½: ½·ln2 + ½·e⁰
])
def test_step0_values_of_the_new_types(loss_type, kw, expected):
    z = torch.zeros(1)
    assert dpo_loss(z, z, z, z, beta=0.1, loss_type=loss_type, **kw)[0].item() == pytest.approx(expected, abs=1e-6)


def test_the_table_has_a_function_for_every_loss_name_the_config_accepts():
    from raydpo.loss_names import LOSS_TYPES

    assert set(LOSS_FNS) == set(LOSS_TYPES) and len(LOSS_FNS) >= 10
    assert reads_chosen_nll("orpo") and reads_chosen_nll(["sigmoid", "sft"]) and reads_chosen_nll("simpo", 0.1)
    assert not reads_chosen_nll("simpo") and not reads_chosen_nll("sigmoid")


def test_metric_sums_carry_nll_only_when_given():
    z = t(0.0, 0.0)
    assert "nll_loss" not in dpo_metric_sums(z, z, z, z, z)
    sums = dpo_metric_sums(z, z, t(-4.0, -6.0), z, z, nll=chosen_nll(t(-4.0, -6.0), torch.tensor([2, 4])))
    assert sums["nll_loss"].item() == pytest.approx(2 * 10 / 6)  # a sum over pairs, like the others
    assert finalize_metrics(sums)["nll_loss"] == pytest.approx(10 / 6)
