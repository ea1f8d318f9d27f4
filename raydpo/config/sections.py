"""The config's sections: one pydantic model per section, each forbidding unknown keys and
checking its own fields (the DPO stage also which losses read which of its fields).
`raydpo.config.root` puts them together and checks across them.

Every field, its default and what it means is here; the jobs' YAML files speak these names.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raydpo.loss_names import LABEL_SMOOTHING, LOSS_TYPES, NLL_ONLY, needs_reference

DTYPES = Literal["float32", "bfloat16", "float16"]
# a training stage: what the data pipeline, the loops and the driver are called for
Stage = Literal["sft", "dpo"]
BUILTIN_MODEL = "tiny"
BUILTIN_SOURCE = "sample"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Preference-data formats (`raydpo.data.formats` reads them) and their canonical column names,
# which ``data.columns`` maps onto a dataset's own names.
DATA_FORMATS = ("stack_exchange", "standard", "conversational", "implicit_prompt")
CANONICAL_COLUMNS = ("question", "response_j", "response_k", "prompt", "chosen", "rejected")


class Section(BaseModel):
    """A config section: an unknown key is an error, and so is an invalid assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(Section):
    """Where preference pairs come from and how they become token ids."""

    source: str = Field(BUILTIN_SOURCE, description="'sample', a local file/folder, or a hub dataset id")
    format: Literal["auto", "stack_exchange", "standard", "conversational", "implicit_prompt"] = Field(
        "auto", description="row format; auto: decided per source from the columns of its first rows")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="canonical column name -> the dataset's, e.g. {prompt: instruction}")
    chat_template: str | None = Field(None, description="jinja chat template for message rows; None: the tokenizer's")
    sft_source: str | None = Field(None, description="SFT rows from this source instead (read like source)")
    split: str = "train"
    sft_data_dir: str | None = Field(None, description="hub data_dir for SFT rows (stack-exchange-paired: data/finetune)")
    dpo_data_dir: str | None = Field(None, description="hub data_dir for DPO rows (stack-exchange-paired: data/rl)")
    sample_size: int = Field(2000, ge=1, description="rows generated when source is 'sample'")
    seed: int = 0
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows")
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    prompt_template: str = "Question: {question}\n\nAnswer: "
    max_length: int = Field(1024, ge=8, description="prompt + response tokens, DPO")
    max_prompt_length: int = Field(512, ge=1, description="prompt tokens kept, DPO")
    sft_block_size: int = Field(1024, ge=8, description="packed SFT block length in tokens")
    max_chars: int = Field(200_000, ge=1, description="rows whose own text (question/prompt + answers, or the "
                           "messages' contents) exceeds this many characters are dropped")
    tokenize_batch_size: int = Field(256, ge=1)
    tokenize_concurrency: int | None = Field(
        None, ge=1, description="tokenizer tasks at once; None: as many as scaling.data_cpus holds")
    tokenize_num_cpus: float = Field(0.25, gt=0.0, description="CPU per tokenize task; keep < 1 so workers don't starve Ray Data")

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(CANONICAL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown column name(s) {', '.join(unknown)}: keys are the canonical names "
                             f"({', '.join(CANONICAL_COLUMNS)}), values the dataset's columns")
        if any(not isinstance(c, str) or not c for c in v.values()):
            raise ValueError("every column must map to a non-empty dataset column name")
        if len(set(v.values())) < len(v):
            raise ValueError("two canonical names map to the same dataset column")
        return v

    @field_validator("chat_template", "sft_source")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it unset instead)")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})"
            )
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}'")
        return self


class TinyModelConfig(Section):
    """Shape of the randomly initialised local Llama used when ``model.name_or_path == 'tiny'``."""

    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(176, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary trained locally")
    max_position_embeddings: int = Field(2048, ge=64)
    seed: int = 0


class ModelConfig(Section):
    name_or_path: str = Field(BUILTIN_MODEL, description="'tiny', a local path, or a hub model id")
    revision: str | None = None
    dtype: DTYPES = Field("float32", description="dtype of the non-quantized weights")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    cache_dir: str = Field(".raydpo_cache", description="where the tiny model/tokenizer are materialized")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class QuantizationConfig(Section):
    mode: Literal["none", "4bit", "8bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: DTYPES = "bfloat16"
    double_quant: bool = True
    quant_storage: DTYPES | None = Field(
        None, description="bnb_4bit_quant_storage; None = compute_dtype, which lets ZeRO-3 shard 4-bit weights"
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"


class DeepSpeedConfig(Section):
    enabled: bool = True
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    stage3_param_persistence_threshold: int | None = Field(
        None, ge=0, description="None: DeepSpeed default; 0 shards even tiny params"
    )

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params requires stage 3")
        return self


GPU_COLLECTIVE_TIMEOUT_S = 1800.0  # torch's own default for NCCL groups
CPU_COLLECTIVE_TIMEOUT_S = 300.0


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; None: the CPUs it was given")
    data_cpus: float = Field(
        1.0, ge=1.0, description="CPUs left to Ray Data; checked against the cluster before training. At least "
        "1: Ray 2.60 file reads plan listing/sampling tasks of one whole CPU, which never run on less"
    )
    collective_timeout_s: float | None = Field(
        None, gt=0.0, description="seconds a collective (all-reduce, broadcast) waits for every rank before "
        "the group fails and Ray restarts it from the last checkpoint (run.max_failures): a hung rank or a dead "
        "link becomes a failure instead of a wait without end. None: 1800 on GPU (a 7B step with a save and a "
        "slow rank fits), 300 on CPU"
    )
    resources_timeout_s: float = Field(
        600.0, gt=0.0, description="seconds a step waits for the cluster to have what it needs (workers, Ray "
        "Data's CPUs, the merge, reference replicas), asking the autoscaler meanwhile; GPU nodes take minutes to "
        "boot. Then it stops with one line and exit 2"
    )

    def collective_timeout(self) -> float:
        """`collective_timeout_s`, or its default for the device."""
        return self.collective_timeout_s or (GPU_COLLECTIVE_TIMEOUT_S if self.use_gpu else CPU_COLLECTIVE_TIMEOUT_S)

    # -- Ray resources: the one place that turns these fields into reservations and counts ----
    def worker_resources(self) -> dict[str, float]:
        """What one training worker reserves in Ray: its CPUs, and its GPUs on GPU."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def trainer_resources(self) -> dict[str, float]:
        """What one TorchTrainer (``num_workers`` workers) reserves: one Tune trial's share."""
        return {k: v * self.num_workers for k, v in self.worker_resources().items()}

    def replica_resources(self) -> dict[str, float]:
        """What one reference-model replica (`raydpo.orchestration.reference`) reserves: a worker's GPUs and no
        CPU on GPU; on CPU a worker's CPUs, at least half a CPU."""
        if self.use_gpu:
            return {"CPU": 0.0, "GPU": self.gpus_per_worker}
        return {"CPU": max(self.cpus_per_worker, 0.5)}


class TrainStageConfig(Section):
    """Fields shared by the SFT and DPO loops."""

    enabled: bool = True
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0.0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_max_batches: int | None = Field(None, ge=1, description="None: the whole eval split")
    save_every: int = Field(100, ge=1, description="checkpoint every N optimizer steps (and at the end)")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="stop after this many steps in a row with a non-finite loss (each is skipped: no update)")
    seed: int = 0


class SFTConfig(TrainStageConfig):
    lr: float = Field(1e-4, gt=0.0, le=1.0)


class DPOConfig(TrainStageConfig):
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    beta: float = Field(0.1, gt=0.0)
    loss_type: str | list[str] = Field(
        "sigmoid", description="a loss name or a list of them (summed with loss_weights), as TRL 1.16's DPOConfig; "
        "also simpo (TRL's CPO) and orpo. See raydpo.losses.dpo_loss for each formula")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type entry; None: 1 each")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, validate_default=True, description="ε of sigmoid (cDPO), robust, exo_pair (> 0 "
                                   "needed), aot, aot_unpaired and simpo")
    simpo_gamma: float = Field(0.5, description="simpo's target reward margin γ (TRL CPOConfig.simpo_gamma)")
    cpo_alpha: float = Field(0.0, ge=0.0, description="simpo: weight of the NLL on the chosen responses (TRL "
                             "CPOConfig.cpo_alpha)")
    discopop_tau: float = Field(0.05, gt=0.0, description="discopop's temperature τ (TRL DPOConfig.discopop_tau)")
    reference: Literal["adapter_disabled", "precomputed"] = Field(
        "precomputed", description="precomputed: the frozen reference's log-probs computed once by Ray Data and "
        "cached by content (reference weights, tokenizer, data); adapter_disabled: a reference forward every step"
    )
    reference_scoring: Literal["workers", "ray_data"] = Field(
        "workers", description="precomputed, not yet cached: who scores it — workers: the training workers at the "
        "fit's start, with the model they loaded (no second model load, no actor pool); ray_data: a Ray Data actor "
        "pool before the fit (a Tune search always uses it: its trials share one pass). Both write the same cache"
    )
    # fast paths, each exact (equal to the plain path within 1e-4) and on by default
    completion_only_logits: bool = Field(True, description="LM head + log-softmax on scored positions only")
    fused_lm_head: bool = Field(True, description="with completion_only_logits: the scored positions' log-probs "
                                "tile by tile (raydpo.models.fused_head), no [rows, scored, vocab] logits; a head "
                                "that is not a plain nn.Linear or logits scaled after it run the plain head (warned)")
    lm_head_tile_tokens: int = Field(512, ge=1, description="fused_lm_head: scored positions per tile (one "
                                     "[tile, vocab] fp32 logits tensor alive at a time)")
    share_prefix: bool = Field(True, description="prompt once, chosen and rejected after it in one sequence")
    padding_free: bool = Field(True, description="pack each micro-batch's sequences into as few rows as fit")
    balance_ranks: bool = Field(True, description="deal each global micro-batch's pairs to the workers by tokens "
                                "(the same pairs per worker), so none waits for a slower one at the all-reduce")
    sanity_check: bool = Field(True, description="stop if the step-0 loss (its preference terms) is not the "
                               "zero-margin value (ln 2 for sigmoid) with rewards ~ 0; skipped for simpo and orpo")
    sft_adapter: str | None = Field(
        None, description="SFT adapter to start from (set by `raydpo pipeline`); None: start from the base model"
    )
    sft_reference: Literal["adapter", "merged"] = Field(
        "adapter", description="DPO from sft_adapter — adapter: the policy trains the SFT adapter itself on the "
        "(4-bit) base and the reference is a frozen copy of it, exactly the SFT model as trained (no merge; the "
        "adapter's LoRA settings must equal lora.*); merged: the SFT adapter is merged into the unquantized base, "
        "which is reloaded (4-bit: requantized, so only near the SFT model: python -m "
        "raydpo.benchmarks.nf4_reference) and trained with a fresh adapter, as stack_llama_2 does"
    )

    @field_validator("loss_type", mode="before")
    @classmethod
    def _loss_type(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"must be a loss name or a non-empty list of names; valid: {', '.join(LOSS_TYPES)}")
        unknown = [n for n in names if n not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss type {', '.join(map(repr, unknown))}; valid: {', '.join(LOSS_TYPES)}")
        if all(n in NLL_ONLY for n in names):
            raise ValueError("needs at least one preference loss besides 'sft' (train SFT alone with the sft stage)")
        return v

    @field_validator("loss_weights")
    @classmethod
    def _loss_weights(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        lt = info.data.get("loss_type")
        if v is None or lt is None:  # an invalid loss_type is reported on its own
            return v
        n = 1 if isinstance(lt, str) else len(lt)
        if len(v) != n:
            raise ValueError(f"{len(v)} weight(s) for {n} loss type(s) {lt!r}: give one weight per loss_type entry")
        if not all(math.isfinite(w) for w in v):
            raise ValueError("weights must be finite")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _label_smoothing(cls, v: float, info: ValidationInfo) -> float:
        lt = info.data.get("loss_type")
        if lt is None:
            return v
        types = {lt} if isinstance(lt, str) else set(lt)
        if "exo_pair" in types and v == 0.0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its loss has log ε; the EXO paper uses 1e-3)")
        if v > 0.0 and not types & set(LABEL_SMOOTHING):
            raise ValueError(f"{v} would be ignored: only {', '.join(LABEL_SMOOTHING)} read it")
        return v

    @field_validator("cpo_alpha")
    @classmethod
    def _cpo_alpha(cls, v: float, info: ValidationInfo) -> float:
        lt = info.data.get("loss_type")
        if v > 0.0 and lt is not None and "simpo" not in ([lt] if isinstance(lt, str) else lt):
            raise ValueError(f"{v} would be ignored: cpo_alpha weights simpo's NLL term; for another loss add 'sft' "
                             "to loss_type with a weight in loss_weights")
        return v

    @property
    def loss_types(self) -> tuple[str, ...]:
        """``loss_type`` as a tuple of names, one name or a list alike."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """False when every loss term is reference-free (simpo, orpo, sft): then there is no
        reference forward, no reference pass and no reference cache (`raydpo.loss_names`)."""
        return needs_reference(self.loss_types)

    @property
    def precomputed_reference(self) -> bool:
        """Whether the reference log-probs are computed once before training (the reference pass)."""
        return self.reference == "precomputed" and self.needs_reference

    @property
    def trains_sft_adapter(self) -> str | None:
        """The SFT adapter the policy trains and the reference copies (``sft_reference: adapter``),
        or None: a fresh adapter (on the base, or on the merged SFT model)."""
        return self.sft_adapter if self.sft_adapter and self.sft_reference == "adapter" else None


class GenerationsConfig(Section):
    """Eval generations (DPO): completions of the first ``num_prompts`` held-out prompts (the
    eval split in ``row_id`` order, distinct prompts) by the policy and by the reference (adapter
    disabled), logged as the MLflow table ``eval_generations.json`` and shown by ``raydpo report``.
    They change nothing in training (the RNG is restored around them): free to change on resume."""

    enabled: bool = True
    num_prompts: int = Field(4, ge=1, le=64, description="K fixed held-out prompts")
    when: Literal["eval", "end"] = Field("eval", description="eval: at every evaluation; end: after the last step only")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    do_sample: bool = Field(False, description="false: greedy")
    temperature: float = Field(1.0, gt=0.0, description="sampling only")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sampling only")
    top_k: int = Field(0, ge=0, description="sampling only; 0: off")

    @model_validator(mode="after")
    def _sampling(self) -> GenerationsConfig:
        if not self.do_sample:
            set_ = [f"{k}={v:g}" for k, v, off in (("temperature", self.temperature, 1.0), ("top_p", self.top_p, 1.0),
                                                  ("top_k", self.top_k, 0)) if v != off]
            if set_:
                raise ValueError(f"{', '.join(set_)} only apply when sampling: set generations.do_sample=true, "
                                 "or leave them at their defaults for greedy decoding")
        return self


class SearchSpace(Section):
    kind: Literal["loguniform", "uniform", "choice", "grid"] = "loguniform"
    low: float | None = None
    high: float | None = None
    values: list[float] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SearchSpace:
        if self.kind in ("loguniform", "uniform"):
            if self.low is None or self.high is None:
                raise ValueError(f"{self.kind} needs low and high")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be < high ({self.high})")
            if self.kind == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        elif not self.values:
            raise ValueError(f"{self.kind} needs a non-empty values list")
        return self


class TuneConfig(Section):
    num_samples: int = Field(8, ge=1)
    beta: SearchSpace = Field(default_factory=lambda: SearchSpace(kind="loguniform", low=0.01, high=0.5))
    lr: SearchSpace = Field(default_factory=lambda: SearchSpace(kind="loguniform", low=1e-6, high=5e-4))
    searcher: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = Field("asha", description="fifo: every trial runs to max_steps")
    metric: Literal["eval/rewards/accuracies", "eval/rewards/margins"] = "eval/rewards/accuracies"
    grace_period: int = Field(1, ge=1, description="ASHA grace period, in evaluations")
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: derived from resources")
    shared_reference: bool = True
    share_data: bool = Field(True, description="materialize the tokenized pairs (with the reference log-probs) once in "
                             "the object store for every trial; false: each trial streams them from storage "
                             "(data larger than the object store)")


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"
    )
    experiment_name: str = Field("raydpo", min_length=1)
    run_name: str | None = None
    log_artifacts: bool = True
    register_model_name: str | None = None


class RunConfig(Section):
    name: str = Field("raydpo", min_length=1, pattern=r"^[\w.\-]+$")
    storage_path: str = Field("raydpo_runs", description="Ray Train storage; shared storage on a cluster")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1: forever")
    timeout_s: float | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per stage: the latest ones, and the best "
                                  "by the eval metric always")
