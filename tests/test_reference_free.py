"""Reference-free losses (simpo, orpo, sft) run no reference forward and no reference pass; the
step-0 sanity check is off for simpo/orpo and checks only the preference part next to sft."""

import contextlib
import math

import numpy as np
import pytest
import torch

from raydpo.config import Config, load_config
from raydpo.train import loop
from raydpo.loss_names import step0_skip_reason
from raydpo.models import pairs
from raydpo.train.loop import SanityCheckError, dpo_forward, sanity_check


def _cfg(**overrides):
    return load_config(None, [f"dpo.{k}={v}" for k, v in overrides.items()])  # values as YAML, like --set


@contextlib.contextmanager
def _no_reference(*_a, **_k):
    raise AssertionError("a reference forward ran for a reference-free loss")
    yield


def _fake_pair_logps(calls):
    # chosen sums -2, -1 over 2 tokens each; rejected -6 over 3, -3 over 2 (the ORPO example of test_losses)
    def f(engine, batch, **head):
        calls.append(engine)
        return t(-2.0, -1.0), t(-6.0, -3.0), torch.tensor([2, 2]), torch.tensor([3, 2])
    return f


t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def test_orpo_forward_runs_the_policy_only_and_logs_trl_metrics(monkeypatch):
    calls = []
    fake = _fake_pair_logps(calls)
    monkeypatch.setattr(loop, "pair_logps", fake)
    monkeypatch.setattr(pairs, "pair_logps", fake)  # the reference forward (pairs.reference_logps)
    monkeypatch.setattr(pairs, "reference_disabled", _no_reference)
    loss, sums = dpo_forward("engine", "model", {}, _cfg(loss_type="orpo"))
    assert calls == ["engine"]  # one forward: the policy's
    # test_losses: per-pair 0.773818, 0.767086 -> mean 0.770452
    assert loss.item() == pytest.approx(0.770452, abs=1e-5)
    # rewards β·mean log-prob: chosen -0.1, -0.05; rejected -0.2, -0.15 (sums over the 2 pairs)
    assert sums["rewards/chosen"].item() == pytest.approx(-0.15) and sums["rewards/rejected"].item() == pytest.approx(-0.35)
    assert sums["nll_loss"].item() == pytest.approx(2 * 0.75)  # (2 + 1) / 4 per pair
    assert sums["logps/chosen"].item() == pytest.approx(-3.0)  # logps/* stay sums


@pytest.mark.parametrize("loss_type", ["simpo", "[simpo, sft]", "[orpo, sft]"])
def test_reference_free_forward_ignores_precomputed_columns(monkeypatch, loss_type):
    fake = _fake_pair_logps([])
    monkeypatch.setattr(loop, "pair_logps", fake)
    monkeypatch.setattr(pairs, "pair_logps", fake)  # the reference forward (pairs.reference_logps)
    monkeypatch.setattr(pairs, "reference_disabled", _no_reference)
    cfg = _cfg(loss_type=loss_type)
    bogus = {"ref_chosen_logps": t(50.0, 50.0), "ref_rejected_logps": t(-50.0, -50.0)}
    assert torch.equal(dpo_forward(None, None, bogus, cfg)[0], dpo_forward(None, None, {}, cfg)[0])


def test_reference_losses_still_run_the_reference_forward(monkeypatch):
    calls, entered = [], []

    @contextlib.contextmanager
    def ref(model):
        entered.append(model)
        yield

    fake = _fake_pair_logps(calls)
    monkeypatch.setattr(loop, "pair_logps", fake)
    monkeypatch.setattr(pairs, "pair_logps", fake)  # the reference forward (pairs.reference_logps)
    monkeypatch.setattr(pairs, "reference_disabled", ref)
    loss, sums = dpo_forward("engine", "model", {}, _cfg(loss_type="[sigmoid, sft]", loss_weights=[1.0, 0.5]))
    assert calls == ["engine", "engine"] and entered == ["model"]
    # policy == reference (the fake returns the same numbers): sigmoid ln 2, plus 0.5 × NLL 0.75
    assert loss.item() == pytest.approx(math.log(2) + 0.375, abs=1e-6)
    assert "nll_loss" in sums and sums["rewards/chosen"].item() == 0.0


def test_tiny_model_simpo_forward_is_one_pass(tmp_path, monkeypatch):
    from raydpo.data.collate import collate_dpo
    from raydpo.data.rows import format_prompt
    from raydpo.data.sample import generate_rows
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.models.factory import load_model, resolve_model_path
    from raydpo.data.tokenizer import load_tokenizer

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path), "dpo.loss_type": "simpo",
                                   "dpo.reference": "adapter_disabled", "lora.dropout": 0.0})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(3, seed=2)
    ids = tokenize_dpo(tok, [format_prompt(r["question"], cfg.data.prompt_template) for r in rows],
                       [r["response_j"] for r in rows], [r["response_k"] for r in rows], 96, 48)
    b = collate_dpo({k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items() if k.endswith("_input_ids")},
                    tok.pad_token_id, share_prefix=True, pack=True)
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path).eval()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setattr(pairs, "reference_disabled", _no_reference)
    loss, sums = dpo_forward(model, model, b, cfg)
    assert len(forwards) == 1 and torch.isfinite(loss)
    # the fresh adapter's simpo loss is not ln 2: it depends on the base model's own log-probs
    assert sums["rewards/chosen"].item() < 0 and abs(loss.item() - math.log(2)) > 1e-3
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the same batch with sigmoid and adapter_disabled: two forwards (policy, reference)
    monkeypatch.undo()
    forwards.clear()
    with torch.no_grad():
        dpo_forward(model, model, b, cfg.with_overrides({"dpo.loss_type": "sigmoid"}))
    assert len(forwards) == 2


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "[orpo, sft]", "[sigmoid, simpo]"])
def test_sanity_check_is_off_for_simpo_and_orpo_with_a_reason(loss_type):
    why = step0_skip_reason(_cfg(loss_type=loss_type).dpo.loss_types)
    assert why and "reference-free" in why and "ln 2" in why


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "[sigmoid, sft]", "[apo_zero, hinge]"])
def test_sanity_check_applies_to_reference_losses(loss_type):
    assert step0_skip_reason(_cfg(loss_type=loss_type).dpo.loss_types) is None


def test_sanity_check_compares_the_preference_part_only():
    cfg = _cfg(loss_type="[sigmoid, hinge, sft]", loss_weights=[1.0, 0.5, 2.0])
    # step 0: 1·ln 2 + 0.5·relu(1 - 0) = 1.193147; the sft term 2 × NLL (3.1 here) is the base model's own
    good = {"loss": 1.193147 + 2 * 3.1, "nll_loss": 3.1, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    sanity_check(good, cfg)
    with pytest.raises(SanityCheckError, match=r"preference loss \(loss minus the sft term\) 1\.2431 \(expected 1\.1931\)"):
        sanity_check({**good, "loss": good["loss"] + 0.05}, cfg)
    # without sft the whole loss is compared
    sanity_check({"loss": 50.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}, _cfg(loss_type="sppo_hard"))
    with pytest.raises(SanityCheckError, match=r"loss 0\.6931 \(expected 25\.0000\)"):
        sanity_check({"loss": math.log(2), "rewards/chosen": 0.0, "rewards/rejected": 0.0}, _cfg(loss_type="ipo"))


def test_no_reference_pass_for_reference_free_losses(monkeypatch):
    import raydpo.data.pipeline
    import raydpo.orchestration.launch
    import raydpo.orchestration.reference
    from raydpo.data.reach import Reach

    def boom(*_a, **_k):
        raise AssertionError("the reference pass ran")

    monkeypatch.setattr(raydpo.orchestration.reference, "reference_datasets", boom)
    monkeypatch.setattr(raydpo.data.pipeline, "build_datasets", lambda cfg, stage, tok, reach: ("train", "eval"))
    monkeypatch.setattr(raydpo.data.pipeline, "find_reach", lambda cfg, stage, tok: Reach(100, 5))
    for lt, name in (("simpo", "simpo"), ("orpo", "orpo"), ("[simpo, sft]", "simpo+sft")):
        lines = []
        assert raydpo.orchestration.launch.stage_datasets(_cfg(loss_type=lt), "dpo", "base", "tok", lines.append) == ("train", "eval")
        assert lines[0] == f"[dpo] loss {name} reads no reference: no reference pass and no reference forward in any step"
    with pytest.raises(AssertionError, match="reference pass"):
        raydpo.orchestration.launch.stage_datasets(_cfg(loss_type="[sigmoid, sft]"), "dpo", "base", "tok")
