"""The fused, tiled LM head (`raydpo.models.fused_head`, ``dpo.fused_lm_head``) gives the plain
completion-only head's numbers — DPO losses, rewards, log-probs and LoRA gradients within 1e-5 in
fp32, in every collate layout, with tiles smaller than the scored positions (several tiles, a ragged
last one) — while keeping no ``[*, vocab]`` tensor for the backward; a head it cannot stand in for
runs the plain one, with a warning; under ZeRO-3 (every weight partitioned) it equals ZeRO-3's plain
head, the head's own weight trained too."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from raydpo import losses
from raydpo.config import Config
from raydpo.data.collate import collate_dpo, ragged
from raydpo.models.fused_head import TiledTargetLogps, fused_head
from raydpo.models.pairs import packed_attention, pair_logps, reference_logps
from raydpo.models.tiny import random_llama
from policies import trained_looking_policy

V, H = 2048, 64
LAYOUTS = {"padded": (False, False), "share_prefix": (True, False), "padding_free": (False, True),
           "share_prefix+padding_free": (True, True)}
TOL = dict(rtol=1e-5, atol=1e-5)
PLAIN = dict(completion_only=True, fused_head=False)
FALLBACK = "dpo.fused_lm_head:"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    random_llama(0, vocab_size=V, hidden_size=H, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                 pad_token_id=3).save_pretrained(out)
    return str(out)


def _cfg(quant="none", **over) -> Config:
    return Config().with_overrides({"quantization.mode": quant, "quantization.compute_dtype": "float32",
                                    "lora.dropout": 0.0, **over})


def _cols(n=5, seed=0) -> dict:
    """Pairs of very different prompt and response lengths (padding and packing matter)."""
    rng = np.random.default_rng(seed)

    def ids(k):
        return rng.integers(4, V, int(k), dtype=np.int64)

    lens = [(3 + 9 * i, 40 - 6 * i, 7 + 11 * i) for i in range(n)]
    return {"prompt_input_ids": ragged([ids(p) for p, _, _ in lens]),
            "chosen_input_ids": ragged([ids(c) for _, c, _ in lens]),
            "rejected_input_ids": ragged([ids(r) for _, _, r in lens])}


def _batch(layout: str) -> dict:
    share, pack = LAYOUTS[layout]
    return collate_dpo(_cols(), 3, share_prefix=share, pack=pack)


def _dpo_step(model, batch, **head) -> tuple[torch.Tensor, dict, dict]:
    """(loss, {rewards, log-probs}, trainable grads) of one sigmoid-DPO forward and backward,
    policy and reference (adapter disabled) both through ``head``'s settings."""
    model.zero_grad(set_to_none=True)
    with packed_attention(model, batch):
        c, r, _, _ = pair_logps(model, batch, **head)
        ref_c, ref_r = reference_logps(model, batch, **head)
        per_ex, rc, rr = losses.dpo_loss(c, r, ref_c, ref_r, beta=0.1, loss_type="sigmoid")
        per_ex.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {"chosen_rewards": rc, "rejected_rewards": rr, "chosen": c, "rejected": r, "ref_chosen": ref_c}
    return per_ex.mean().detach(), {k: v.detach() for k, v in out.items()}, grads


def _assert_same(a, b, name):
    (loss_a, sums_a, grads_a), (loss_b, sums_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **TOL, msg=name)
    for k in sums_b:
        torch.testing.assert_close(sums_a[k], sums_b[k], **TOL, msg=f"{name} {k}")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_b:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6, msg=f"{name} {n}")


def test_the_tiled_function_is_log_softmax_and_gather_with_its_gradients():
    """Against autograd through ``log_softmax(h @ W.T + b)[target]`` on a small case: the values,
    and the gradients of the hidden states (frozen head: computed in the forward), then of the
    hidden states, weight and bias together (trained head: recomputed in the backward), for one
    tile, ragged tiles and tiles of one position."""
    g = torch.Generator().manual_seed(0)
    N, Hs, Vs = 37, 16, 50
    hidden = torch.randn(N, Hs, generator=g, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, Vs, (N,), generator=g)
    head = torch.nn.Linear(Hs, Vs)
    upstream = torch.randn(N, generator=g)
    for trained in (False, True):
        head.requires_grad_(trained)
        inputs = [hidden, head.weight, head.bias] if trained else [hidden]
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)
        want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        want_grads = torch.autograd.grad(want, inputs, upstream)
        for tile in (N, 8, 1):
            got = TiledTargetLogps.apply(hidden, head.weight, head.bias, targets, head, tile, True)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for a, b in zip(torch.autograd.grad(got, inputs, upstream), want_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", ["none", "4bit"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_fused_head_equals_the_plain_head_in_every_layout(folder, layout, quant):
    """Several tiles with a ragged last one (7 positions each), and one tile of them all."""
    model = trained_looking_policy(_cfg(quant), folder)
    batch = _batch(layout)
    scored = int((batch["score_slot"] >= 0).sum())
    assert scored > 7 * 10 and scored % 7 and scored < 4096  # many tiles of 7, a ragged last; 4096: one tile
    plain = _dpo_step(model, batch, **PLAIN)
    assert abs(plain[1]["chosen_rewards"]).max() > 1e-3  # not a trivial 0 == 0 comparison
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for tile in (7, 4096):
            _assert_same(_dpo_step(model, batch, completion_only=True, fused_head=True, tile_tokens=tile), plain,
                         f"{layout} {quant} tile {tile}")
    assert not [w for w in seen if FALLBACK in str(w.message)]  # it was the fused head that ran


def test_a_trained_head_gets_the_plain_heads_gradient(folder):
    """``lm_head`` trained beside the adapter: the backward recomputes the tiles for its gradient."""
    model = trained_looking_policy(_cfg(), folder)
    model.get_output_embeddings().weight.requires_grad_(True)
    batch = _batch("share_prefix+padding_free")
    plain = _dpo_step(model, batch, **PLAIN)
    assert any("lm_head" in n for n in plain[2])
    _assert_same(_dpo_step(model, batch, completion_only=True, fused_head=True, tile_tokens=7), plain, "trained head")


def _saved_numels(model, batch, **head) -> list[tuple[int, tuple[int, ...]]]:
    """(numel, shape) of every tensor autograd saves for the backward of the policy's log-probs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), packed_attention(model, batch):
        c, r, _, _ = pair_logps(model, batch, **head)
    return saved


def test_no_vocab_sized_tensor_is_kept_for_the_backward(folder):
    """The plain head keeps fp32 ``[scored, V]`` logits for its backward; the fused head keeps
    nothing with a vocabulary-sized dimension — not even one tile — and less in all by about that."""
    model = trained_looking_policy(_cfg(), folder)
    batch = _batch("share_prefix+padding_free")
    scored = batch["score_pos"].numel()
    plain = _saved_numels(model, batch, **PLAIN)
    fused = _saved_numels(model, batch, completion_only=True, fused_head=True, tile_tokens=16)
    assert any(V in shape and n >= scored * V for n, shape in plain)  # the hook sees the plain head's logits
    assert not [shape for _, shape in fused if V in shape]
    assert sum(n for n, _ in fused) <= sum(n for n, _ in plain) - scored * V + scored * H


def test_a_head_it_cannot_stand_in_for_runs_the_plain_head_and_says_so(folder):
    """LoRA on ``lm_head`` (a PEFT layer, not nn.Linear) and a model that soft-caps its logits after
    the head: the same numbers as ``fused_head=False``, and one warning naming the reason."""
    lora_head = trained_looking_policy(_cfg(**{"lora.target_modules": ["q_proj", "lm_head"]}), folder)
    batch = _batch("share_prefix+padding_free")
    with torch.no_grad():
        want = pair_logps(lora_head, batch, **PLAIN)
        with pytest.warns(UserWarning, match="not a plain nn.Linear"):
            got = pair_logps(lora_head, batch, completion_only=True, fused_head=True, tile_tokens=7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    capped = trained_looking_policy(_cfg(), folder)
    capped.config.final_logit_softcapping = 30.0
    with pytest.warns(UserWarning, match="final_logit_softcapping"), fused_head(capped, batch["score_tgt"], 7) as on:
        assert not on
    assert "forward" not in vars(capped.get_output_embeddings())  # the head untouched


@pytest.mark.parametrize("trained", [False, True], ids=["frozen head", "trained head"])
def test_zero3_partitioned_head_equals_its_plain_head(folder, gloo, trained):
    """DeepSpeed ZeRO-3, every weight partitioned (``stage3_param_persistence_threshold=0``): the
    fused head runs inside the head module's call, so the weight is gathered for its forward and
    for its backward; the loss and every full gradient equal ZeRO-3's plain head's, the LoRA run's
    (frozen head) and with the head trained too (its backward reads the gathered weight)."""
    from deepspeed.utils import safe_get_full_grad

    from raydpo.train.engine import WorkerEnv, build_engine

    cfg = _cfg(**{"deepspeed.stage": 3, "deepspeed.stage3_param_persistence_threshold": 0, "deepspeed.precision":
                  "fp32", "scaling.num_workers": 1, "dpo.gradient_accumulation_steps": 1})
    model = trained_looking_policy(cfg, folder)
    model.get_output_embeddings().weight.requires_grad_(trained)
    engine, _, _ = build_engine(model, cfg, cfg.dpo, WorkerEnv(0, 1, torch.device("cpu"), False))
    assert model.get_output_embeddings().weight.numel() == 0  # partitioned outside its module's call
    batch = _batch("share_prefix+padding_free")
    runs = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for name, kw in (("plain", PLAIN), ("fused", dict(completion_only=True, fused_head=True, tile_tokens=7))):
            with packed_attention(engine, batch):
                c, r, _, _ = pair_logps(engine, batch, **kw)
                ref_c, ref_r = reference_logps(model, batch, engine=engine, **kw)
                loss = losses.dpo_loss(c, r, ref_c, ref_r, beta=0.1)[0].mean()
                engine.backward(loss)
            grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters() if p.requires_grad}
            engine.optimizer.zero_grad()
            runs[name] = (loss.detach(), {"chosen": c.detach(), "rejected": r.detach(), "ref": ref_c}, grads)
    assert not [w for w in seen if FALLBACK in str(w.message)]
    assert any("lm_head" in n for n in runs["plain"][2]) == trained
    assert runs["plain"][2].keys() == runs["fused"][2].keys()
    _assert_same(runs["fused"], runs["plain"], "zero3")
