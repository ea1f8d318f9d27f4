"""Model and tokenizer factory: hub id, local path or the tiny local Llama; optional bitsandbytes
4-bit (NF4/FP4) or 8-bit; PEFT LoRA. Knows nothing about Ray.

The DPO reference is the same model with the adapter disabled (``model.disable_adapter()``):
no second copy in memory. When DPO starts from SFT, its base is the merged SFT model
(`merge_adapter`), so "adapter disabled" means "the SFT model", as in stack_llama_2.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from raydpo import losses
from raydpo.config import BUILTIN_MODEL, LoraConfig, ModelConfig, QuantizationConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """``"tiny"`` -> the materialized tiny Llama folder (built once); a local path or hub id -> itself."""
    if model_cfg.name_or_path == BUILTIN_MODEL:
        from raydpo.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg))
    return model_cfg.name_or_path


# Organisations whose models are gated on the Hugging Face Hub (the licence must be accepted,
# downloads need a token). Offline we cannot ask the Hub, so these are known by name.
GATED_ORGS = ("meta-llama/", "mistralai/", "google/gemma")


def check_hub_access(model_cfg: ModelConfig) -> str | None:
    """One line if the model is a gated hub id, not in the local cache, and no token is set;
    else None. Run where the stage runs, before Ray: a worker would only fail after minutes."""
    name = model_cfg.name_or_path
    if name == BUILTIN_MODEL or Path(name).exists() or not name.startswith(GATED_ORGS):
        return None
    from huggingface_hub import get_token, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=model_cfg.revision)
    if isinstance(cached, str) or get_token():
        return None
    return (f"model.name_or_path {name} is gated on the Hugging Face Hub and no token is set: accept its licence on "
            "huggingface.co, then `huggingface-cli login` or set HF_TOKEN (on the cluster: in the job's env)")


def bnb_config(q: QuantizationConfig) -> BitsAndBytesConfig | None:
    """``BitsAndBytesConfig`` for 4-bit (NF4/FP4) or 8-bit, or None for ``mode: none``.

    4-bit weights are packed into ``bnb_4bit_quant_storage`` = ``quant_storage`` or the compute
    dtype: DeepSpeed ZeRO-3 (like FSDP) can then partition and all-gather them as ordinary
    floating tensors, whereas the default uint8 storage cannot be sharded.

    The storage dtype must also equal DeepSpeed's mixed-precision dtype (bf16 on GPU) at every
    ZeRO stage: DeepSpeed 0.19 casts each floating parameter *by value* to bf16/fp16
    (``engine._cast_module_mixed_precision``), which destroys packed fp32 storage
    (``test_models.py::test_deepspeed_bf16_cast_needs_bf16_quant_storage``). fp32 DeepSpeed
    (CPU) casts nothing.
    """
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
        bnb_4bit_quant_storage=DTYPES[q.quant_storage or q.compute_dtype],
    )


def load_base(model_cfg: ModelConfig, quant_cfg: QuantizationConfig, *, base_path: str | None = None,
              device: str | torch.device = "cpu") -> PreTrainedModel:
    """The base causal LM, quantized on load when ``quant_cfg.mode != "none"``.

    ``model_cfg.dtype`` is the dtype of the weights bnb does not quantize (embeddings, norms,
    lm_head). ``model_cfg.revision`` applies to the configured model only: a different
    ``base_path`` (e.g. a merged SFT folder) is loaded as is.
    """
    from transformers import AutoModelForCausalLM

    path = base_path or resolve_model_path(model_cfg)
    quant = bnb_config(quant_cfg)
    kwargs = dict(
        revision=model_cfg.revision if path == model_cfg.name_or_path else None,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=DTYPES[model_cfg.dtype],
    )
    if quant is not None:
        # bnb quantizes while loading, on the device it loads to
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant,
                                                     device_map={"": torch.device(device)}, **kwargs)
        return keep_bnb_cpu_layout(model)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)


def keep_bnb_cpu_layout(model):
    """Turn off bitsandbytes' AVX512-BF16 weight repacking on CPU (bnb 0.50).

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode under ``no_grad`` rewrites
    its weight, in place and for good, into an inference-only layout: it asserts
    ``out_features % 32 == 0`` (the tiny model's 176-wide MLP fails it), and once repacked the
    layer runs through ``gemv_4bit`` even back in training mode. A training run evaluates and
    then trains again, so the canonical layout must stay. No effect on GPU or on other CPUs.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_model(model_cfg: ModelConfig, quant_cfg: QuantizationConfig, lora_cfg: LoraConfig, *,
               base_path: str | None = None, device: str | torch.device = "cpu", adapter_path: str | None = None,
               trainable: bool = True) -> PeftModel:
    """Base (quantized or not) + a fresh LoRA adapter, or the adapter at ``adapter_path``.

    Quantized: ``prepare_model_for_kbit_training`` (freezes the base, upcasts the fp16/bf16
    non-quantized weights to fp32, optional gradient checkpointing). Not quantized: gradient
    checkpointing (``use_reentrant=False``) when ``model_cfg.gradient_checkpointing``. The
    reference for DPO is this model under ``disable_adapter()``. ``trainable`` only applies to
    a loaded adapter (a new one is always trainable).

    DeepSpeed caveats (the loop's concern, recorded here because they follow from this setup):
    the fp32 upcast leaves mixed dtypes, which a bf16 engine casts back to bf16 by value —
    harmless only when ``quant_storage`` is bf16 (see `bnb_config`); TRL 1.16 skips
    ``prepare_model_for_kbit_training`` for sharded QLoRA. TRL 1.16 also forces
    ``use_reentrant=True`` for PEFT + ZeRO-3 + gradient checkpointing (trl#2514); this
    function uses ``use_reentrant=False`` (what PyTorch recommends), fine for stages 0-2.
    """
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
    """(trainable, total) parameter counts. bnb 4-bit weights are counted by their logical shape,
    not the packed storage (two 4-bit values per byte)."""

    def n(p) -> int:
        qs = getattr(p, "quant_state", None)
        return int(qs.shape.numel()) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()

    params = list(model.parameters())
    return sum(n(p) for p in params if p.requires_grad), sum(n(p) for p in params)


@contextlib.contextmanager
def reference_disabled(model: PeftModel) -> Iterator[PeftModel]:
    """The DPO reference: ``model`` with its LoRA adapter disabled, under ``torch.no_grad()``.

    Pass the PeftModel itself (under DeepSpeed, ``engine.module``); calling the engine inside
    the block is fine, the adapter switch is on the shared modules. No second copy of the
    weights exists: with a fresh adapter this is the base (or merged SFT) model.
    """
    with torch.no_grad(), model.disable_adapter():
        yield model


def pair_attention_mask(seq_ids: torch.Tensor, segments: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """The ``[R, 1, T, T]`` mask of a shared-prefix / packed DPO batch (`raydpo.data.collate`).

    Query i sees key j when both are in the same sequence of the row, j <= i, and not (i is a
    rejected token and j a chosen one): each response sees its prompt and its own prefix, exactly
    its context in the plain layout. Padding sees only itself, so no softmax row is empty (an
    all-masked row gives NaN in SDPA, and NaN * 0 in the backward is still NaN). Boolean (True =
    attend) for SDPA; ``additive`` gives the 0 / -inf float form eager attention adds.
    """
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    cross = (segments[:, :, None] == 2) & (segments[:, None, :] == 1)
    eye = torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    m = ((same & causal & ~cross) | eye).unsqueeze(1)
    if additive:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


PAIR_ATTENTION = "raydpo_pairs"


def pair_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                   dropout: float = 0.0, scaling: float | None = None, raydpo_spans=None, **kwargs):
    """Attention over a padding-free DPO row (`raydpo.data.collate`, ``pack=True``), registered
    with transformers' ``AttentionInterface``: per sequence ``(start, P, A, B)``, the prompt and
    first response attend causally (SDPA ``is_causal``: the blocks above the diagonal are skipped,
    not computed and masked), and a second response (shared prefix) attends the prompt and
    itself only. No attention crosses sequences and no position is padding, so this equals the
    masked attention of the other layouts. ``query`` ``[1, H, N, D]``; returns ``[1, N, H, D]``.
    """
    import torch.nn.functional as F

    if raydpo_spans is None:
        raise RuntimeError(f"{PAIR_ATTENTION} attention needs the batch's spans (call models.pair_logps)")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: the per-sequence calls below take as many key heads as query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # one split per tensor, not a slice per sequence: a slice's backward writes a full-length
    # zero tensor per sequence, a split's backward is one concatenation
    sizes = [n for _, p, a, b in raydpo_spans for n in (p + a, b)]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    outs = []
    for i, (_, p, a, b) in enumerate(raydpo_spans):
        q1, k1, v1 = qs[2 * i], ks[2 * i], vs[2 * i]
        outs.append(F.scaled_dot_product_attention(q1, k1, v1, dropout_p=dropout, is_causal=True, scale=scaling))
        if b:
            k = torch.cat([k1[:, :, :p], ks[2 * i + 1]], dim=2)
            v = torch.cat([v1[:, :, :p], vs[2 * i + 1]], dim=2)
            mask = torch.ones(b, p + b, dtype=torch.bool, device=query.device)
            mask[:, p:] = torch.ones(b, b, dtype=torch.bool, device=query.device).tril()
            outs.append(F.scaled_dot_product_attention(qs[2 * i + 1], k, v, attn_mask=mask, dropout_p=dropout,
                                                       scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def packed_attention(model, batch: dict[str, torch.Tensor]):
    """The scope in which a padding-free batch (one with ``spans``) must be both run forward *and*
    backpropagated: gradient checkpointing recomputes each layer inside the backward, and the
    recomputation must use the same per-sequence attention as the forward (outside it the model
    is back on sdpa/eager, which saves other tensors: torch's checkpoint fails with "a different
    number of tensors was saved"). Other layouts: nothing to do. Nested scopes are fine."""
    return _attention(model, PAIR_ATTENTION) if "spans" in batch else contextlib.nullcontext()


@contextlib.contextmanager
def _attention(model, name: str) -> Iterator[None]:
    """Run ``model`` with the attention implementation ``name`` (registered once), then restore it."""
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, pair_attention)
    config = getattr(getattr(model, "module", model), "config")
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _attn_implementation(model) -> str:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the PeftModel
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) or "sdpa"


def pair_logps(model, batch: dict[str, torch.Tensor], completion_only: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """THE DPO forward: one pass over a collated batch of ``B`` pairs (any layout of
    `raydpo.data.collate.collate_dpo`) -> ``(chosen_logps, rejected_logps, chosen_tokens,
    rejected_tokens)``, each ``[B]``; log-probs are fp32 sums over the response tokens.

    ``completion_only``: the LM head and the fp32 log-softmax run on the scored positions only
    (``logits_to_keep`` = the ``[R, S]`` scoring index), never on prompt or padding positions —
    no ``[R, T, V]`` logits. Off: full logits, then the same positions are picked (the plain path,
    kept for the ablation and the equality tests). The training loop, the reference pass and the
    tests all call this. ``model`` is anything callable like a HF causal LM (PeftModel,
    DeepSpeed engine); the reference is this call under `reference_disabled`.
    """
    pos = batch["score_pos"]
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if "spans" in batch:  # padding-free: attention per sequence, no mask
        kw["raydpo_spans"] = batch["spans"].tolist()
    elif "attention_mask" in batch:  # plain layout: the model builds its causal + padding mask
        kw["attention_mask"] = batch["attention_mask"]
    else:  # shared prefix in padded rows
        kw["attention_mask"] = pair_attention_mask(batch["seq_ids"], batch["segments"],
                                                   additive=_attn_implementation(model) == "eager")
    with packed_attention(model, batch):  # a caller that backpropagates holds it open until after backward
        if completion_only:
            logits = model(**kw, logits_to_keep=pos).logits  # [R, S, V]
        else:
            full = model(**kw).logits  # [R, T, V]
            logits = torch.take_along_dim(full, pos[..., None], dim=1)
            del full
    slot = batch["score_slot"]
    valid = slot >= 0
    tok = losses.token_logps(logits, batch["score_tgt"]) * valid
    B = batch["pair_lengths"].shape[0]
    idx = slot.clamp(min=0).reshape(-1)
    sums = torch.zeros(2 * B, dtype=torch.float32, device=tok.device).index_add(0, idx, tok.reshape(-1))
    counts = torch.zeros(2 * B, dtype=torch.int64, device=tok.device).index_add(0, idx, valid.reshape(-1).long())
    return sums[:B], sums[B:], counts[:B], counts[B:]


def merge_adapter(base_path: str, adapter_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Base (unquantized, ``dtype``) + adapter, merged into a plain Hugging Face model folder.

    Merging into 4-bit weights would round the update away, so the base is always loaded
    unquantized; the result can be loaded 4-bit again (DPO's base after SFT). The tokenizer
    comes from the adapter folder when it has one (training saves it there), else the base.
    Returns ``out_dir``.
    """
    import peft
    from transformers import AutoModelForCausalLM

    from raydpo.data.tokenizer import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype])
    merged = peft.PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir)
    tok_src = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    load_tokenizer(tok_src).save_pretrained(out_dir)
    return out_dir


def export_adapter(adapter_path: str, out_dir: str, merge: bool, dtype: str = "float32") -> str:
    """Copy an adapter, or merge it into its base (``--merge``) as a plain HF model folder."""
    import json
    import shutil

    cfg_file = Path(adapter_path) / "adapter_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
    if not merge:
        shutil.copytree(adapter_path, out_dir, dirs_exist_ok=True)
        return out_dir
    base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    return merge_adapter(base, adapter_path, out_dir, dtype)
