"""Model factory: 4-bit NF4 + LoRA, the reference = adapter disabled, and the SFT→DPO reference."""

from pathlib import Path

import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.tokenize import tokenize_dpo
from raydpo.data.tokenizer import load_tokenizer
from raydpo.losses import sequence_logps
from raydpo.models.factory import (
    bnb_config,
    count_parameters,
    load_model,
    merge_adapter,
    resolve_model_path,
)
from raydpo.models.pairs import pair_logps, reference_disabled


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_cache):
    # vocab 300 keeps the local BPE training well under a second
    return Config().with_overrides({"model.cache_dir": tiny_cache,
                                    "model.tiny.vocab_size": 300})


@pytest.fixture(scope="module")
def batch(cfg):
    tok = load_tokenizer(resolve_model_path(cfg.model))
    out = tokenize_dpo(tok, ["Question: How do I undo a commit?\n\nAnswer: "] * 2,
                       ["Use git reset --soft HEAD~1.", "Run git revert."], ["Just google it.", "No idea."], 128, 64)
    return collate_dpo({k: np.array(v, dtype=object) for k, v in out.items()}, tok.pad_token_id)


def plain_labels(b):
    """Labels of the plain layout (-100 on prompt and padding), for `losses.sequence_logps`."""
    labels = torch.full_like(b["input_ids"], -100)
    B = b["pair_lengths"].shape[0]
    for r in range(2 * B):
        P, C, R = b["pair_lengths"][r % B].tolist()
        n = C if r < B else R
        labels[r, P:P + n] = b["input_ids"][r, P:P + n]
    return labels


def concatenated(model, b):
    c, r, _, _ = pair_logps(model, b)
    return c, r


def logps(model, b):
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        return sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, plain_labels(b))


def _disabled_logps(model, b):
    with model.disable_adapter():
        return logps(model, b)


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_resolve_model_path(cfg, tmp_path):
    tiny = resolve_model_path(cfg.model)
    assert (Path(tiny) / "config.json").exists() and resolve_model_path(cfg.model) == tiny  # built once
    for other in (str(tmp_path), "meta-llama/Llama-2-7b-hf"):
        assert resolve_model_path(cfg.with_overrides({"model.name_or_path": other}).model) == other


def test_tokenizer_without_pad_falls_back_to_eos(cfg, tmp_path):
    tok = load_tokenizer(resolve_model_path(cfg.model))
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    tok.pad_token = None  # like Llama 2
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.pad_token == again.eos_token == "</s>" and again.padding_side == "right"


def test_bnb_config():
    from raydpo.config import QuantizationConfig

    assert bnb_config(QuantizationConfig(mode="none")) is None
    q = bnb_config(QuantizationConfig(mode="4bit", quant_type="fp4", compute_dtype="float16", double_quant=False))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16 and q.bnb_4bit_quant_storage == torch.float16  # storage = compute
    q = bnb_config(QuantizationConfig(mode="4bit", quant_storage="float32"))
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.float32
    assert bnb_config(QuantizationConfig(mode="8bit")).load_in_8bit


def test_lora_targets_q_v_and_only_adapter_trains(cfg):
    model = load_model(cfg.model, cfg.quantization, cfg.lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    trainable, total = count_parameters(model)
    assert 0 < trainable < total / 10


def test_4bit_nf4_on_cpu_trains_only_the_adapter(cfg, batch):
    import bitsandbytes as bnb

    q = cfg.with_overrides({"quantization.mode": "4bit", "quantization.compute_dtype": "float32"})
    model = load_model(q.model, q.quantization, q.lora)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    assert layers[0].weight.dtype == torch.float32  # quant storage = compute dtype (ZeRO-3 can shard it)
    model.eval()
    pol_c, pol_r = concatenated(model, batch)
    with reference_disabled(model):
        ref_c, ref_r = concatenated(model, batch)
    assert torch.equal(pol_c, ref_c) and torch.equal(pol_r, ref_r)  # fresh adapter on 4-bit: policy == reference
    # an eval pass keeps the trainable layout (bnb repacks for inference on AVX512-BF16 CPUs otherwise)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (-sequence_logps(out.logits, plain_labels(batch)).mean()).backward()
    opt.step()
    # compare bytes: packed 4-bit weights viewed as float can hold NaN patterns (NaN != NaN)
    same = lambda a, b: a.detach().contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))  # noqa: E731
    changed = {n for n, p in model.named_parameters() if not same(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # 4-bit weights counted by their logical shape: same total as the unquantized model
    assert count_parameters(model)[1] == count_parameters(load_model(cfg.model, cfg.quantization, cfg.lora))[1]


def test_4bit_quant_storage_is_honoured(cfg):
    import bitsandbytes as bnb

    q = cfg.with_overrides({"quantization.mode": "4bit", "quantization.compute_dtype": "float32",
                            "quantization.quant_storage": "bfloat16", "quantization.quant_type": "fp4"})
    model = load_model(q.model, q.quantization, q.lora)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # only the Linear layers of the decoder are quantized (lm_head is skipped by transformers)
    assert len(layers) == 7 * cfg.model.tiny.num_hidden_layers
    w = layers[0].weight
    assert w.dtype == torch.bfloat16 and w.quant_type == "fp4" and layers[0].compute_dtype == torch.float32
    # 64x64 weights = 4096 4-bit values = 2048 bytes = 1024 bf16 storage elements
    assert w.numel() * w.element_size() * 2 == w.quant_state.shape.numel()


def test_gradient_checkpointing_unquantized_still_trains_lora(cfg, batch):
    gc = cfg.with_overrides({"model.gradient_checkpointing": True, "lora.dropout": 0.0})
    model = load_model(gc.model, gc.quantization, gc.lora)
    assert model.base_model.model.is_gradient_checkpointing
    perturb_lora(model)  # lora_B = 0 would leave lora_A without gradient
    model.train()
    c, r = concatenated(model, batch)
    (c - r).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_deepspeed_bf16_cast_needs_bf16_quant_storage(cfg):
    # DeepSpeed 0.19's bf16 engine does `p.data = p.data.to(bf16)` for every floating parameter
    # (engine._cast_module_mixed_precision). Packed 4-bit storage must already be bf16 to survive it.
    ids = torch.arange(3, 19).reshape(2, 8)

    def ds_bf16_cast(model):
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.float32, torch.float64):
                p.data = p.data.to(torch.bfloat16)

    for storage, survives in (("bfloat16", True), ("float32", False)):
        q = cfg.with_overrides({"quantization.mode": "4bit", "quantization.compute_dtype": storage})
        model = load_model(q.model, q.quantization, q.lora).eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits.float()
            ds_bf16_cast(model)
            if survives:  # only norms / embeddings / lm_head / LoRA lost precision
                assert torch.allclose(model(input_ids=ids).logits.float(), before, atol=0.05)
            else:  # fp32-packed bytes were rounded to bf16: half the elements, wrong bits
                try:  # bnb 0.50 raises on the shape; a silent garbage forward would be worse
                    after = model(input_ids=ids).logits.float()
                except RuntimeError:
                    continue
                assert not torch.allclose(after, before, atol=0.05)


def test_fresh_adapter_is_the_reference_and_disable_adapter_is_the_base(cfg, batch):
    from transformers import AutoModelForCausalLM

    model = load_model(cfg.model, cfg.quantization, cfg.lora)
    model.eval()
    pol_c, pol_r = concatenated(model, batch)
    with reference_disabled(model):
        ref_c, ref_r = concatenated(model, batch)
    # step 0: lora_B = 0, so policy == reference bit for bit
    assert torch.equal(pol_c, ref_c) and torch.equal(pol_r, ref_r)
    assert not ref_c.requires_grad and pol_c.requires_grad
    perturb_lora(model)
    assert not torch.allclose(concatenated(model, batch)[0], ref_c)
    # with the adapter disabled it is the plain base model, loaded without PEFT
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model)).eval()
    base_c, base_r = concatenated(plain, batch)
    with reference_disabled(model):
        again_c, again_r = concatenated(model, batch)
    assert torch.allclose(again_c, base_c, atol=1e-5) and torch.allclose(again_r, base_r, atol=1e-5)
    assert torch.allclose(again_c, ref_c, atol=1e-5)
    assert concatenated(model, batch)[0].requires_grad  # the adapter is back on, with grad


def test_pair_logps_is_one_forward_and_equals_sequence_logps_over_the_plain_labels(cfg, batch):
    model = load_model(cfg.model, cfg.quantization, cfg.lora)
    perturb_lora(model)
    model.eval()
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        for completion_only in (True, False):
            c, r, n_c, n_r = pair_logps(model, batch, completion_only=completion_only)
            assert c.shape == r.shape == (2,) and c.dtype == torch.float32
            labels = plain_labels(batch)
            full = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  labels)
            assert torch.allclose(torch.cat([c, r]), full, rtol=1e-5, atol=1e-4)
            counts = (labels[:, 1:] != -100).sum(-1)
            assert torch.equal(torch.cat([n_c, n_r]), counts)  # IPO's length normaliser
    # ONE forward over all 2B rows per call (the other calls are the sequence_logps checks)
    assert calls[0] == calls[2] == batch["input_ids"].shape and len(calls) == 4


def test_dpo_reference_is_the_sft_model_not_the_base(cfg, batch, tmp_path):
    from peft import AutoPeftModelForCausalLM

    base_path = resolve_model_path(cfg.model)
    sft = load_model(cfg.model, cfg.quantization, cfg.lora)
    base_lp = logps(sft, batch)
    perturb_lora(sft, seed=1)  # stands in for SFT training
    sft_lp = logps(sft, batch)
    sft.save_pretrained(tmp_path / "sft")
    load_tokenizer(base_path).save_pretrained(tmp_path / "sft")
    merged = merge_adapter(base_path, str(tmp_path / "sft"), str(tmp_path / "merged"))

    # the merged folder is a plain HF model reproducing the SFT adapter model's logits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.allclose(plain(**args).logits, sft(**args).logits, atol=1e-4)
    assert load_tokenizer(merged).pad_token_id == load_tokenizer(base_path).pad_token_id

    # the SFT adapter reloads frozen through load_model
    frozen = load_model(cfg.model, cfg.quantization, cfg.lora, adapter_path=str(tmp_path / "sft"), trainable=False)
    assert count_parameters(frozen)[0] == 0
    resumed = load_model(cfg.model, cfg.quantization, cfg.lora, adapter_path=str(tmp_path / "sft"))  # resume
    assert count_parameters(resumed)[0] == count_parameters(sft)[0] > 0
    assert torch.allclose(logps(frozen, batch), sft_lp, atol=1e-5)

    dpo = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=merged)  # fresh DPO adapter
    assert torch.equal(logps(dpo, batch), (ref_lp := _disabled_logps(dpo, batch)))  # step 0: policy == reference
    assert torch.allclose(ref_lp, sft_lp, atol=1e-4)
    assert not torch.allclose(ref_lp, base_lp, atol=1e-2)

    # a saved adapter loads with plain peft and generates
    dpo.save_pretrained(tmp_path / "dpo")
    again = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "dpo")
    ids = batch["input_ids"][:1, :10]
    assert again.generate(input_ids=ids, max_new_tokens=5, do_sample=False, min_new_tokens=5).shape[1] == 15


@pytest.mark.parametrize("groups", [1, 2])
def test_pair_attention_equals_masked_attention_over_the_padding_free_row(groups):
    import torch.nn.functional as F

    from raydpo.models.pairs import pair_attention, pair_attention_mask

    torch.manual_seed(0)
    spans = [(0, 3, 2, 2), (7, 1, 3, 0), (11, 2, 1, 3)]  # shared prefix, a lone sequence, shared again
    N, H, D = 17, 4, 8
    q = torch.randn(1, H, N, D, requires_grad=True)
    k = torch.randn(1, H // groups, N, D, requires_grad=True)
    v = torch.randn(1, H // groups, N, D, requires_grad=True)
    seq = torch.tensor([[i for i, (_, p, a, b) in enumerate(spans) for _ in range(p + a + b)]])
    seg = torch.tensor([[x for _, p, a, b in spans for x in [0] * p + [1] * a + [2] * b]])
    module = type("Attn", (), {"num_key_value_groups": groups})()
    out, _ = pair_attention(module, q, k, v, scaling=0.3, raydpo_spans=spans)
    mask = pair_attention_mask(seq, seg)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask, scale=0.3).transpose(1, 2)
    assert out.shape == (1, N, H, D) and torch.allclose(out, want, atol=1e-6)
    g1 = torch.autograd.grad(out.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    with pytest.raises(RuntimeError, match="spans"):
        pair_attention(module, q, k, v)
