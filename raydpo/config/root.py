"""The whole config: every section (`raydpo.config.sections`), the checks across sections, and
its conversions (plain data for Ray workers, flat params for MLflow, YAML, absolute paths).

The whole config crosses to Ray workers as plain data (``Config.to_dict()``) and is rebuilt
there with ``Config.from_dict`` — workers hold no globals.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from raydpo.config.keys import ConfigError, flatten, set_dotted, validation_errors
from raydpo.config.sections import (
    BUILTIN_MODEL,
    BUILTIN_SOURCE,
    DataConfig,
    DeepSpeedConfig,
    DPOConfig,
    GenerationsConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    RunConfig,
    ScalingConfig,
    Section,
    SFTConfig,
    Stage,
    TrackingConfig,
    TrainStageConfig,
    TuneConfig,
)


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    generations: GenerationsConfig = Field(default_factory=GenerationsConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross(self) -> Config:
        q = self.quantization
        if q.mode != "none" and self.deepspeed.enabled and self.deepspeed.stage == 3:
            storage = q.quant_storage or q.compute_dtype
            if q.mode == "8bit":
                raise ValueError("8-bit weights cannot be sharded by ZeRO-3; use 4bit or stage 2")
            if storage != q.compute_dtype:
                raise ValueError(
                    f"quantization.quant_storage ({storage}) must equal compute_dtype ({q.compute_dtype}) under ZeRO-3"
                )
        if self.deepspeed.enabled and self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            # DeepSpeed 0.19.8 raises "Type fp16 is not supported on your device" inside initialize
            raise ValueError("deepspeed.precision fp16 needs a GPU (scaling.use_gpu); DeepSpeed on CPU trains "
                             "fp32 or bf16")
        if (self.dpo.share_prefix or self.dpo.padding_free) and self.model.attn_implementation == "flash_attention_2":
            raise ValueError("dpo.share_prefix and dpo.padding_free need a custom attention mask: use "
                             "model.attn_implementation sdpa or eager, or turn both off for flash_attention_2")
        if q.mode == "4bit" and self.deepspeed.enabled:
            # DeepSpeed bf16/fp16 casts every floating tensor of the module; 4-bit weights packed
            # into a float storage of another dtype are reinterpreted and destroyed silently.
            p = resolve_precision(self, self.scaling.use_gpu)
            want = {"bf16": "bfloat16", "fp16": "float16"}.get(p)
            storage = q.quant_storage or q.compute_dtype
            if want and storage != want:
                raise ValueError(
                    f"quantization.quant_storage ({storage}) must be {want} when deepspeed.precision "
                    f"resolves to {p}: DeepSpeed casts the packed 4-bit weights to {want} and would corrupt them"
                )
        return self

    def stage(self, name: Stage) -> TrainStageConfig:
        """The section of training stage ``name`` ('sft' or 'dpo')."""
        return self.sft if name == "sft" else self.dpo

    def tokenize_tasks(self) -> int:
        """Tokenizer tasks at once: ``data.tokenize_concurrency``, or as many as ``scaling.data_cpus``
        holds at ``data.tokenize_num_cpus`` each (one task would leave a 4-CPU Ray Data share idle)."""
        d = self.data
        return d.tokenize_concurrency or max(1, int(self.scaling.data_cpus / d.tokenize_num_cpus + 1e-9))

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ConfigError(validation_errors(e)) from None

    def flat(self) -> dict[str, Any]:
        """``{"dpo.beta": 0.1, ...}``: the resolved config flattened, for MLflow params."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_absolute_paths(self, cwd: str | None = None) -> Config:
        """Local paths made absolute against ``cwd`` (default: this process's), so processes
        with another working dir (Tune trials run in their trial folder) see the same files."""
        import os

        base = cwd or os.getcwd()

        def local(p: str | None, must_exist: bool) -> str | None:
            if p in (None, BUILTIN_SOURCE, BUILTIN_MODEL) or "://" in p or os.path.isabs(os.path.expanduser(p)):
                return os.path.expanduser(p) if p else p
            full = os.path.normpath(os.path.join(base, p))
            return full if (os.path.exists(full) or not must_exist) else p

        return self.with_overrides({
            "run.storage_path": local(self.run.storage_path, False),
            "model.cache_dir": local(self.model.cache_dir, False),
            "model.name_or_path": local(self.model.name_or_path, True),
            "data.source": local(self.data.source, True),
            "data.sft_source": local(self.data.sft_source, True),
            "dpo.sft_adapter": local(self.dpo.sft_adapter, True),
        })

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with ``{"dpo.beta": 0.2, ...}`` applied."""
        d = self.to_dict()
        for k, v in overrides.items():
            try:
                set_dotted(d, k, v)
            except KeyError as e:
                raise ConfigError([(k, str(e.args[0]))]) from None
        return Config.from_dict(d)


def resolve_precision(cfg: Config, use_gpu: bool) -> str:
    """DeepSpeed's precision: ``auto`` means bf16 on GPU (what the QLoRA recipe trains in) and
    fp32 on CPU. The one rule: validation (`Config`), `raydpo.train.deepspeed` and the memory estimate
    all call it."""
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if use_gpu else "fp32"
    return p
