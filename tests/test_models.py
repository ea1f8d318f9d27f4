"""Model factory: 4-bit NF4 + LoRA, the reference = adapter disabled, and the SFT→DPO reference."""

import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.tokenize import tokenize_dpo
from raydpo.losses import sequence_logps
from raydpo.models import count_parameters, load_model, load_tokenizer, merge_adapter, resolve_model_path


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return Config().with_overrides({"model.cache_dir": str(tmp_path_factory.mktemp("cache"))})


@pytest.fixture(scope="module")
def batch(cfg):
    tok = load_tokenizer(resolve_model_path(cfg.model))
    out = tokenize_dpo(tok, ["Question: How do I undo a commit?\n\nAnswer: "] * 2,
                       ["Use git reset --soft HEAD~1.", "Run git revert."], ["Just google it.", "No idea."], 128, 64)
    return collate_dpo({k: np.array(v, dtype=object) for k, v in out.items()}, tok.pad_token_id)


def logps(model, b):
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        return sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


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
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (-sequence_logps(out.logits, batch["labels"]).mean()).backward()
    opt.step()
    # compare bytes: packed 4-bit weights viewed as float can hold NaN patterns (NaN != NaN)
    same = lambda a, b: a.detach().contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))  # noqa: E731
    changed = {n for n, p in model.named_parameters() if not same(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_fresh_adapter_is_the_reference_and_disable_adapter_is_the_base(cfg, batch):
    model = load_model(cfg.model, cfg.quantization, cfg.lora)
    base = logps(model, batch)
    with model.disable_adapter():
        assert torch.equal(logps(model, batch), base)  # step 0: policy == reference
    perturb_lora(model)
    assert not torch.allclose(logps(model, batch), base)
    with model.disable_adapter():
        assert torch.allclose(logps(model, batch), base)


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

    dpo = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=merged)  # fresh DPO adapter
    with dpo.disable_adapter():
        ref_lp = logps(dpo, batch)
    assert torch.allclose(ref_lp, sft_lp, atol=1e-4)
    assert not torch.allclose(ref_lp, base_lp, atol=1e-2)

    # a saved adapter loads with plain peft and generates
    dpo.save_pretrained(tmp_path / "dpo")
    again = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "dpo")
    ids = batch["input_ids"][:1, :10]
    assert again.generate(input_ids=ids, max_new_tokens=5, do_sample=False, min_new_tokens=5).shape[1] == 15
