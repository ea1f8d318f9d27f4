"""Model and tokenizer factory: hub id, local path or the tiny local Llama; optional bitsandbytes
4-bit (NF4/FP4) or 8-bit; PEFT LoRA. Knows nothing about Ray.

The DPO reference is the same model with the adapter disabled (``model.disable_adapter()``):
no second copy in memory. When DPO starts from SFT, its base is the merged SFT model
(`merge_adapter`), so "adapter disabled" means "the SFT model", as in stack_llama_2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from raydpo.config import BUILTIN_MODEL, LoraConfig, ModelConfig, QuantizationConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_cfg: ModelConfig) -> str:
    if model_cfg.name_or_path == BUILTIN_MODEL:
        from raydpo.tiny import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg))
    return model_cfg.name_or_path


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """A tokenizer with a pad token and right padding. Llama 2 ships no pad token: like
    stack_llama_2 we fall back to EOS (the pad positions are masked out of every loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def bnb_config(q: QuantizationConfig):
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_use_double_quant=q.double_quant,
        # packed 4-bit weights stored in the compute dtype: ZeRO-3 can then shard them
        bnb_4bit_quant_storage=DTYPES[q.quant_storage or q.compute_dtype],
    )


def load_base(model_cfg: ModelConfig, quant_cfg: QuantizationConfig, *, base_path: str | None = None,
              device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    path = base_path or resolve_model_path(model_cfg)
    quant = bnb_config(quant_cfg)
    kwargs = dict(revision=None if base_path else model_cfg.revision, attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    if quant is not None:
        dtype = DTYPES[quant_cfg.compute_dtype]
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                     device_map={"": torch.device(device)}, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_cfg.dtype], **kwargs).to(device)
    return model


def load_model(model_cfg: ModelConfig, quant_cfg: QuantizationConfig, lora_cfg: LoraConfig, *,
               base_path: str | None = None, device: str | torch.device = "cpu", adapter_path: str | None = None,
               trainable: bool = True):
    """Base (quantized or not) + a fresh LoRA adapter, or the adapter at ``adapter_path``."""
    import peft

    model = load_base(model_cfg, quant_cfg, base_path=base_path, device=device)
    if quant_cfg.mode != "none":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter_path:
        model = peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules), bias=lora_cfg.bias, task_type="CAUSAL_LM"))
    trainable_n, total = count_parameters(model)
    log.info("model %s: %d trainable of %d parameters", base_path or model_cfg.name_or_path, trainable_n, total)
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_adapter(base_path: str, adapter_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Base (unquantized, ``dtype``) + adapter, merged into a plain Hugging Face model folder."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype])
    merged = peft.PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir)
    tok_src = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    load_tokenizer(tok_src).save_pretrained(out_dir)
    return out_dir
