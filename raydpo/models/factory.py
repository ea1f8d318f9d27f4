"""Model and tokenizer factory: hub id, local path or the tiny local Llama; optional bitsandbytes
4-bit (NF4/FP4) or 8-bit; PEFT LoRA. Knows nothing about Ray.

The DPO reference is the same model with the adapter disabled (``model.disable_adapter()``):
no second copy in memory. When DPO starts from SFT (`load_stage_model`), either the policy trains
the SFT adapter itself and the reference is a frozen copy of it on the same base
(``dpo.sft_reference: adapter``, `add_reference_copy`: exactly the SFT model, 4-bit included), or
its base is the merged SFT model (``merged``, `merge_adapter`), so "adapter disabled" means the
SFT model as in stack_llama_2 — under 4-bit a requantized one, only near it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from raydpo import storage, storage_copy
from raydpo.config import BUILTIN_MODEL, Config, LoraConfig, ModelConfig, QuantizationConfig

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

    source = base_path or resolve_model_path(model_cfg)
    revision = model_cfg.revision if source == model_cfg.name_or_path else None
    path = storage_copy.local_copy(source)  # a folder in run storage (object store): this node's copy of it
    quant = bnb_config(quant_cfg)
    kwargs = dict(
        revision=revision,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=DTYPES[model_cfg.dtype],
    )
    if quant is not None:
        # bnb quantizes while loading, on the device it loads to
        model = keep_bnb_cpu_layout(AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, device_map={"": torch.device(device)}, **kwargs))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    # PEFT records this as an adapter's base: the storage location, not this node's temporary copy
    model.name_or_path = model.config._name_or_path = source
    return model


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
               trainable: bool = True, engine_dtype: str | None = None, reference_copy: bool = False) -> PeftModel:
    """Base (quantized or not) + a fresh LoRA adapter, or the adapter at ``adapter_path`` (with
    ``reference_copy``, a frozen copy of it beside: `add_reference_copy`), cast as the training
    engine will cast it (``engine_dtype``: `cast_like_engine`).

    Quantized: ``prepare_model_for_kbit_training`` (freezes the base, upcasts the fp16/bf16
    non-quantized weights to fp32, optional gradient checkpointing). Not quantized: gradient
    checkpointing (``use_reentrant=False``) when ``model_cfg.gradient_checkpointing``. The
    reference for DPO is this model under `raydpo.models.pairs.reference_disabled`. ``trainable``
    only applies to a loaded adapter (a new one is always trainable).

    DeepSpeed caveats (the loop's concern, recorded here because they follow from this setup):
    the fp32 upcast leaves mixed dtypes, which a bf16 engine casts back to bf16 by value (done
    here already with ``engine_dtype``, for the policy and the reference alike) — harmless only
    when ``quant_storage`` is bf16 (see `bnb_config`); TRL 1.16 skips
    ``prepare_model_for_kbit_training`` for sharded QLoRA. TRL 1.16 also forces
    ``use_reentrant=True`` for PEFT + ZeRO-3 + gradient checkpointing (trl#2514); this
    function uses ``use_reentrant=False`` (what PyTorch recommends), fine at every stage: DeepSpeed
    0.19.8 re-gathers frozen weights for the recompute (deepspeed#8148; tests/test_zero3_qlora.py).
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
        model = peft.PeftModel.from_pretrained(model, storage_copy.local_copy(adapter_path), is_trainable=trainable)
        if reference_copy:
            add_reference_copy(model)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules), bias=lora_cfg.bias, task_type="CAUSAL_LM"))
    cast_like_engine(model, engine_dtype)
    trainable_n, total = count_parameters(model)
    log.info("model %s: %d trainable of %d parameters", base_path or model_cfg.name_or_path, trainable_n, total)
    return model


def load_stage_model(cfg: Config, stage: str, *, base_path: str | None = None, device: str | torch.device = "cpu",
                     engine_dtype: str | None = None) -> PeftModel:
    """The model ``stage`` trains, as at step 0: a fresh adapter on ``base_path`` (the base, or
    for DPO with ``dpo.sft_reference: merged`` the merged SFT model); for DPO from
    ``dpo.sft_adapter`` with ``dpo.sft_reference: adapter``, the SFT adapter itself, trainable,
    on ``base_path`` (the base SFT trained on) beside its frozen reference copy. Training workers
    and the precomputed reference pass load through here alike."""
    start = sft_policy_adapter(cfg) if stage == "dpo" else None
    return load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base_path, device=device, adapter_path=start,
                      engine_dtype=engine_dtype, reference_copy=start is not None)


def sft_policy_adapter(cfg: Config) -> str | None:
    """The SFT adapter DPO's policy trains and its reference copies (``dpo.sft_reference:
    adapter``), or None: a fresh adapter (on the base, or on the merged SFT model)."""
    return cfg.dpo.trains_sft_adapter


def step0_dropout_reason(cfg: Config) -> str | None:
    """Why the DPO step-0 sanity check cannot hold, or None: a policy that trains the SFT adapter
    applies its LoRA dropout in training mode, the frozen reference copy none, so at step 0 they
    differ by the dropout noise (a fresh adapter contributes nothing, dropped out or not)."""
    if sft_policy_adapter(cfg) is None or cfg.lora.dropout == 0:
        return None
    return (f"the policy trains the SFT adapter (dpo.sft_reference=adapter) with lora.dropout={cfg.lora.dropout}, "
            "its reference copy without: they differ by the dropout noise at step 0 (lora.dropout=0 checks exactly)")


def add_reference_copy(model: PeftModel) -> PeftModel:
    """A frozen copy of ``model``'s adapter beside it, named `raydpo.models.pairs.REF_ADAPTER`,
    without dropout: DPO's reference when the policy trains an SFT adapter, as TRL 1.16's
    DPOTrainer adds its "ref" adapter to a PeftModel that carries one. The copy's tensors are the
    adapter's own values (cast together later), so at step 0 policy and reference compute the same
    numbers; frozen, it is neither optimized nor in the engine's checkpoint state (frozen
    parameters are excluded). `raydpo.models.pairs.reference_disabled` switches to it."""
    import copy

    from raydpo.models.pairs import REF_ADAPTER

    config = copy.deepcopy(model.peft_config["default"])
    config.lora_dropout, config.inference_mode = 0.0, True  # the reference is deterministic in train mode too
    model.add_adapter(REF_ADAPTER, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", f".{REF_ADAPTER}.")).copy_(p)
    return model


# what DeepSpeed casts (``deepspeed.runtime.engine.CASTABLE_DTYPES``): floating storage only
CASTABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cast_like_engine(model, dtype: str | None):
    """Cast ``model`` in place as the training engine casts it, so that a model loaded for the
    reference scores in the policy's numerics: every floating parameter to ``dtype`` by value
    (`raydpo.train.deepspeed.engine_cast_dtype`), buffers untouched. This is DeepSpeed 0.19's
    cast under bf16 / fp16 at every ZeRO stage (``engine._cast_module_mixed_precision``, no
    ``zero.Init``): it reaches the embeddings, norms and LM head `prepare_model_for_kbit_training`
    upcast to fp32, a plain model's fp32 weights and the LoRA weights; 4-bit weights are already
    stored as ``dtype`` (`bnb_config`, checked by the config), 8-bit ones are int8; rotary
    ``inv_freq`` stays fp32 (DeepSpeed casts buffers only with ``data_types.buffer_dtype``). Done
    to the policy before ``deepspeed.initialize`` (whose own cast is then a no-op) and to the
    precomputed reference's model. None: nothing (DeepSpeed fp32, the plain engine)."""
    if dtype is None:
        return model
    to = DTYPES[dtype]
    for p in model.parameters():
        if p.dtype in CASTABLE_DTYPES and p.dtype != to:
            p.data = p.data.to(to)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. bnb 4-bit weights are counted by their logical shape,
    not the packed storage (two 4-bit values per byte)."""

    def n(p) -> int:
        qs = getattr(p, "quant_state", None)
        return int(qs.shape.numel()) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()

    params = list(model.parameters())
    return sum(n(p) for p in params if p.requires_grad), sum(n(p) for p in params)


def merge_adapter(base_path: str, adapter_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Base (unquantized, ``dtype``) + adapter, merged into a plain Hugging Face model folder.

    Merging into 4-bit weights would round the update away, so the base is always loaded
    unquantized; the result can be loaded 4-bit again (DPO's base after SFT). The tokenizer
    comes from the adapter folder when it has one (training saves it there), else the base.
    Any of the three may be in run storage (`raydpo.storage`: local or an object store); a merge
    into an object store is written to a local folder first and uploaded. Returns ``out_dir``.
    """
    import shutil
    import tempfile

    import peft
    from transformers import AutoModelForCausalLM

    from raydpo.data.tokenizer import load_tokenizer

    base_path, adapter_path = storage_copy.local_copy(base_path), storage_copy.local_copy(adapter_path)
    local_out = tempfile.mkdtemp(prefix="raydpo-merge-") if storage.is_remote(out_dir) else out_dir
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype])
    merged = peft.PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(local_out)
    tok_src = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    load_tokenizer(tok_src).save_pretrained(local_out)
    if local_out != out_dir:
        storage.upload(local_out, out_dir)
        shutil.rmtree(local_out, ignore_errors=True)
    return out_dir


def export_adapter(adapter_path: str, out_dir: str, merge: bool, dtype: str = "float32") -> str:
    """Copy an adapter, or merge it into its base (``--merge``) as a plain HF model folder."""
    import json
    import shutil

    adapter_path = storage_copy.local_copy(adapter_path)  # an adapter in an object store: downloaded
    cfg_file = Path(adapter_path) / "adapter_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
    if not merge:
        if storage.is_remote(out_dir):
            storage.upload(adapter_path, out_dir)
        else:
            shutil.copytree(adapter_path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(storage.COPY_DONE))
        return out_dir
    base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    return merge_adapter(base, adapter_path, out_dir, dtype)
