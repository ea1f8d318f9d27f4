"""raydpo: preference fine-tuning (SFT -> DPO with QLoRA and DeepSpeed ZeRO) as Ray jobs."""

__version__ = "0.1.0"
