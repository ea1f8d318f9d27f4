"""Every DPO fast path gives the plain path's numbers: the same pairs per step, and losses,
rewards, log-probs and LoRA gradients within rtol = atol = 1e-4 (fp32, and 4-bit with fp32
compute), for the sigmoid and IPO losses — and a short training run follows the same loss curve."""

import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.models.factory import load_model, resolve_model_path
from raydpo.models.pairs import pair_logps
from raydpo.data.tokenizer import load_tokenizer
from raydpo.train.loop import dpo_forward
from policies import trained_looking_policy

PLAIN = {"dpo.completion_only_logits": False, "dpo.share_prefix": False, "dpo.padding_free": False}
FAST = {  # each fast path on its own, then all together (the default)
    "completion_only_logits": {**PLAIN, "dpo.completion_only_logits": True, "dpo.fused_lm_head": False},
    "completion_only_logits+fused_lm_head": {**PLAIN, "dpo.completion_only_logits": True},
    "share_prefix": {**PLAIN, "dpo.share_prefix": True},
    "padding_free": {**PLAIN, "dpo.padding_free": True},
    "share_prefix+padding_free": {**PLAIN, "dpo.share_prefix": True, "dpo.padding_free": True},
    "default": {},
}
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def _cfg(cache, quant, loss_type, overrides):
    return Config().with_overrides({"model.cache_dir": cache, "quantization.mode": quant,
                                    "quantization.compute_dtype": "float32", "dpo.loss_type": loss_type,
                                    "lora.dropout": 0.0, **overrides})


def _cols(tok, n=6, seed=3):
    """Pairs of very different lengths (so padding and packing matter), one of them truncated."""
    rows = generate_rows(n, seed=seed)
    prompts = [format_prompt(r["question"][: 30 + 60 * i], "Question: {question}\n\nAnswer: ") for i, r in enumerate(rows)]
    ids = tokenize_dpo(tok, prompts, [r["response_j"][: 40 + 50 * i] for i, r in enumerate(rows)],
                       [r["response_k"][: 200 - 30 * i] for i, r in enumerate(rows)], 160, 64)
    return {k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items() if k != "truncated"}


def _run(cfg, model, cols, pad):
    b = collate_dpo(cols, pad, share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)
    model.zero_grad(set_to_none=True)
    loss, sums = dpo_forward(model, model, b, cfg)
    loss.backward()
    with torch.no_grad():
        c, r, _, _ = pair_logps(model, b, completion_only=cfg.dpo.completion_only_logits)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {k: v.detach() for k, v in sums.items()}, (c, r), grads, b


@pytest.mark.parametrize("quant", ["none", "4bit"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_each_fast_path_equals_the_plain_path(cache, quant, loss_type):
    plain_cfg = _cfg(cache, quant, loss_type, PLAIN)
    path = resolve_model_path(plain_cfg.model)
    tok = load_tokenizer(path)
    cols = _cols(tok)
    model = trained_looking_policy(plain_cfg, path)
    loss0, sums0, (c0, r0), grads0, b0 = _run(plain_cfg, model, cols, tok.pad_token_id)
    assert abs(sums0["rewards/chosen"].item()) > 1e-3, sums0  # not a trivial 0 == 0 comparison
    for name, overrides in FAST.items():
        cfg = _cfg(cache, quant, loss_type, overrides)
        loss, sums, (c, r), grads, b = _run(cfg, model, cols, tok.pad_token_id)
        assert torch.allclose(loss, loss0, **TOL), name
        for k in sums0:
            assert torch.allclose(sums[k], sums0[k], **TOL), (name, k)
        assert torch.allclose(c, c0, **TOL) and torch.allclose(r, r0, **TOL), name
        for n in grads0:
            assert torch.allclose(grads[n], grads0[n], rtol=1e-4, atol=1e-5), (name, n)
        if cfg.dpo.share_prefix or cfg.dpo.padding_free:  # and it computed fewer positions
            assert b["input_ids"].numel() < b0["input_ids"].numel(), name


def test_fast_default_training_follows_the_plain_loss_curve(cache):
    curves = {}
    for name, overrides in (("plain", PLAIN), ("default", {})):
        cfg = _cfg(cache, "none", "sigmoid", overrides)
        path = resolve_model_path(cfg.model)
        tok = load_tokenizer(path)
        torch.manual_seed(0)
        model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        cols = _cols(tok, n=8, seed=1)
        losses = []
        for step in range(6):
            part = {k: v[(step % 2) * 4:(step % 2) * 4 + 4] for k, v in cols.items()}  # the same pairs per step
            b = collate_dpo(part, tok.pad_token_id, share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)
            loss, _ = dpo_forward(model, model, b, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = losses
    assert abs(curves["plain"][0] - np.log(2)) < 1e-5  # a fresh adapter: policy == reference
    assert curves["plain"][-1] < curves["plain"][0] - 1e-3  # it trained
    np.testing.assert_allclose(curves["default"], curves["plain"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cpus,override,want", [(0.5, None, 1), (2.0, None, 2), (1.5, None, 1), (0.5, 3, 3)])
def test_a_worker_runs_as_many_torch_threads_as_cpus_it_was_given(cpus, override, want):
    from raydpo.train.engine import set_torch_threads

    before = torch.get_num_threads()
    try:
        scaling = Config().with_overrides({"scaling.cpus_per_worker": cpus, "scaling.torch_threads": override}).scaling
        assert set_torch_threads(scaling) == want == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
