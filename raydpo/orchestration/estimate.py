"""Memory and time of a DPO step before any GPU hour is spent: a pure function of the config.

`estimate(cfg)` returns an `Estimate`: per-worker peak memory in parts (GiB), the FLOPs of one
optimizer step, seconds per step and per epoch at a stated rate. No torch, Ray, DeepSpeed,
bitsandbytes or MLflow is imported (a test proves it), no network call is made: the model's shape
comes from a local ``config.json`` (the model folder, or the Hugging Face cache), the ``tiny``
section, or `BUILTIN_SHAPES`. ``raydpo validate --estimate`` prints it; `raydpo.benchmarks.memory` checks it.

The rules, each written once here:

Tokens. A micro-batch of ``B`` pairs at the longest the tokenizer emits (`raydpo.data.tokenize`
keeps ``prompt + longer response <= max_length``): a prompt of ``p`` tokens and two responses of
``L - p``. Shared prefix (``dpo.share_prefix``, one sequence per pair) ``T = B·(2L - p)``, else
``T = B·2L``; scored positions ``S = B·2(L - p)``. The estimate takes ``p = PROMPT_TOKENS`` (1): a
short prompt leaves the responses the most room, the worst case for memory. Padding-free rows add
no padding; padded layouts pad to the longest, which this worst case already is.

Memory (bytes; ``s`` = activation/weight bytes of the compute precision, `compute_bytes`):

* ``base_weights``: 4-bit: 0.5 B per quantized (linear) weight + absmax (fp32 per 64-block, or with
  double quant 1 B per 64 + fp32 per 256 such blocks); 8-bit: 1 B + an fp32 scale per output row;
  none: ``s``. Embeddings, lm_head and norms stay unquantized at ``s``. ZeRO-3 divides by the
  world size (one gathered layer added back); ``offload_params`` leaves one gathered layer.
* ``lora_params`` / ``lora_grads``: ``s`` each per LoRA parameter (PEFT keeps them fp32, a
  bf16/fp16 engine casts them); ``optimizer_states``: Adam ``m`` and ``v`` in fp32 plus an fp32
  master copy (DeepSpeed keeps one under any ZeRO stage and in bf16/fp16 mixed precision). ZeRO
  partitions over the world size: stage >= 1 the optimizer states, >= 2 the gradients, 3 the
  parameters; ``offload_optimizer`` puts the states on the CPU (0 here).
* ``activations``: what autograd keeps for the backward, per token and layer
  ``s·(ACT_H·h + ACT_KV·kv + ACT_I·i) + 2h·(4 - s)`` (constants below; the norms keep fp32
  inputs) plus the LoRA adapters' inputs (with dropout: a dropped-out copy, ``s``, and a bool
  mask, 1 B, per input feature of each target); with gradient checkpointing each layer's input
  (``s·h``) instead, plus one layer recomputed in the backward. Plus the final norm's fp32 input
  (``4h``) and the int64 index of the scored positions' gather (``8h`` per scored position).
  ``ACT_KV - 1`` outside padding-free rows (no copies of the rejected response's k and v). A
  layer's backward working set (``s·(WORK_H·h + WORK_I·i)`` per token; with checkpointing plus
  the recomputed layer) comes after the logits' backward has freed its temporaries, so only what
  it exceeds them by is added.
* ``logits``: ``[S', V]`` with ``S' = S`` (``completion_only_logits``) or ``T``, at the start of
  the backward (every saved activation still alive): the fp32 logits logsumexp keeps (for bf16
  logits, the fp32 copy `raydpo.losses.token_logps` makes) + the backward's gradients: ``s`` for
  ``min(R, 2)`` zero-filled ``[R, S', V]`` row-selection gradients and ``LOGIT_ROW_TEMPS`` fp32
  temporaries of one row (``1/R`` of it); ``R`` rows: 1 padding-free, ``B`` shared prefix, else ``2B``.
  The fused head (``fused_lm_head``): one tile's fp32 logits + logsumexp's fp32 temporary in the
  forward, ``8·min(tile, S')·V``, beside its ``d log p / d hidden`` (``s·h``) and 8 B per scored position.
* ``reference``: 0 for a precomputed reference or a reference-free loss; else what the no-grad
  reference forward (its logits and their fp32 copy — the fused head: one tile's —, one layer's
  working set, beside what the policy's head keeps) adds beyond the logits' peak (it runs before
  the backward: the two are never live together).
* ``overhead``: GPU: the CUDA context (`CUDA_CONTEXT_GIB`) and DeepSpeed's ZeRO-1/2 gradient
  buckets (``reduce_bucket_size`` elements, two when ``overlap_comm``); CPU: 0 — the benchmark
  measures net of the process baseline (Python, torch, DeepSpeed imports), and CPU pages of an
  untouched ``torch.empty`` bucket are never resident.

FLOPs (`step_flops`, the one formula a GPU check shares for MFU): per micro-batch, with ``N`` the
linear (non-embedding) weights of the layers and ``A`` the causal attention matmuls
(``2·h·n²`` per layer forward for a sequence of ``n`` tokens, the shared prefix counted once):
forward ``2N·T + A + 2·h·V·S'``; LoRA backward through frozen weights computes activation
gradients only: ``2N·T + 2A + 2·h·V·S'``; the adapters ``6·N_lora·T``; gradient checkpointing
recomputes the layers' forward ``2N·T + A``; a reference forward every step ``2N·T + A + 2·h·V·S'``
(the fused head moves the head's backward matmul into its forward: the same sum). Times
accumulation steps; per worker (each worker runs its own micro-batches in parallel).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raydpo.config import BUILTIN_MODEL, Config
from raydpo.orchestration.passes import Passes, count_source_rows, data_passes, format_passes
from raydpo.train.deepspeed import REDUCE_BUCKET_SIZE, resolve_precision

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPT_TOKENS = 1  # the worst case: a 1-token prompt leaves both responses L - 1 tokens
# Saved activations per token per layer, in units of s: what autograd keeps in a LlamaDecoderLayer
# whose base weights are frozen (a frozen linear, nn.Linear or bitsandbytes, keeps no input):
# the two norms' inputs (x, x2) 2h, rotary q 1h, attention output 1h; k, v and the rejected
# response's copies of them (padding-free attention, `raydpo.models.pairs.pair_attention`) 3·kv; MLP
# gate, SiLU(gate) and up 3i. Plus the LoRA adapters' inputs (`_layer_saved_bytes`).
ACT_H, ACT_KV, ACT_I = 4, 3, 3
# One layer's backward working set per token, in units of s: gradients of the MLP's three
# i-wide tensors and of the two h-wide norm outputs, live together in the backward.
WORK_H, WORK_I = 2, 3
# The backward of `raydpo.losses.token_logps`, which runs row by row over the R rows of a batch:
# per row, fp32 temporaries of that row's size (logsumexp's x - lse and its exp, the gather's
# zero-filled gradient); per selected row a zero-filled gradient of the whole [R, S', V] logits,
# two of which are live while autograd accumulates them (one when R = 1).
LOGIT_ROW_TEMPS = 3
CUDA_CONTEXT_GIB = 0.5
NF4_BLOCK, DQ_BLOCK = 64, 256


class EstimateError(ValueError):
    """The estimate cannot be made (one line, for the CLI)."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of the layers' linear modules (what bitsandbytes quantizes)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and norms: never quantized."""
        h = self.hidden
        return self.vocab * h * (1 if self.tie_embeddings else 2) + (2 * self.layers + 1) * h

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


# Well-known hub ids: their config.json values (hidden, layers, heads, kv heads, intermediate, vocab).
_L2_7B = Shape(4096, 32, 32, 32, 11008, 32000)
_L2_13B = Shape(5120, 40, 40, 40, 13824, 32000)
_L3_8B = Shape(4096, 32, 32, 8, 14336, 128256)
_M_7B = Shape(4096, 32, 32, 8, 14336, 32000)
BUILTIN_SHAPES: dict[str, Shape] = {
    "meta-llama/Llama-2-7b-hf": _L2_7B, "meta-llama/Llama-2-7b-chat-hf": _L2_7B,
    "meta-llama/Llama-2-13b-hf": _L2_13B, "meta-llama/Llama-2-13b-chat-hf": _L2_13B,
    "meta-llama/Meta-Llama-3-8B": _L3_8B, "meta-llama/Meta-Llama-3-8B-Instruct": _L3_8B,
    "mistralai/Mistral-7B-v0.1": _M_7B,
}


@dataclass(frozen=True)
class Gpu:
    memory_gib: float  # as the datasheet lists it (GB), taken as GiB; a little less is usable
    tflops: float  # peak dense bf16 tensor TFLOP/s (no sparsity), fp32 accumulate
    source: str


GPUS: dict[str, Gpu] = {
    "A10G": Gpu(24, 70.0, "NVIDIA A10G (AWS EC2 G5) product brief: 70 TF bf16 dense (the A10 lists 125)"),
    "L4": Gpu(24, 121.0, "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TF with sparsity, 121 dense"),
    "A100-40GB": Gpu(40, 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TF dense"),
    "A100-80GB": Gpu(80, 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TF dense"),
    "H100-80GB": Gpu(80, 989.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TF with sparsity, 989 dense"),
    "H200": Gpu(141, 989.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TF with sparsity, 989 dense"),
    "RTX4090": Gpu(24, 165.2, "NVIDIA Ada Lovelace architecture whitepaper, appendix: RTX 4090 BF16 with FP32 "
                   "accumulate 165.2 TF dense"),
}


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


GPU_ALIASES = {  # and torch.cuda.get_device_name() less "NVIDIA" (the GPU check looks its device up so)
    "a100": "A100-80GB", "h100": "H100-80GB", "h100sxm": "H100-80GB", "h10080gbsxm": "H100-80GB", "4090": "RTX4090",
    "a10g24gb": "A10G", "l424gb": "L4", "h10080gbhbm3": "H100-80GB", "a100sxm480gb": "A100-80GB",
    "a100sxm440gb": "A100-40GB", "a10080gbpcie": "A100-80GB", "a100pcie40gb": "A100-40GB", "geforcertx4090": "RTX4090"}


def find_gpu(name: str) -> tuple[str, Gpu]:
    """A `GPUS` entry by name, case and punctuation insensitive (``h100``, ``rtx-4090``)."""
    by = {_norm(k): k for k in GPUS} | {a: k for a, k in GPU_ALIASES.items()}
    if _norm(name) in by:
        k = by[_norm(name)]
        return k, GPUS[k]
    raise EstimateError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --tflops)")


# -- shape ----------------------------------------------------------------------------------


def _shape_from_json(d: dict[str, Any]) -> Shape:
    heads = int(d["num_attention_heads"])
    return Shape(hidden=int(d["hidden_size"]), layers=int(d["num_hidden_layers"]), heads=heads,
                 kv_heads=int(d.get("num_key_value_heads") or heads), intermediate=int(d["intermediate_size"]),
                 vocab=int(d["vocab_size"]), tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def _hub_cache_config(repo_id: str, env: dict[str, str]) -> Path | None:
    """``config.json`` of a hub model already in the local Hugging Face cache (no network)."""
    roots = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"),
             os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None,
             os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]
    for root in filter(None, roots):
        snaps = Path(root) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
        if found:
            return found[-1]
    return None


def model_shape(cfg: Config, env: dict[str, str] | None = None) -> tuple[Shape, str]:
    """(shape, where it came from): a local folder's config.json, the HF cache, ``tiny``, the table."""
    env = dict(os.environ) if env is None else env
    name = cfg.model.name_or_path
    if name == BUILTIN_MODEL:
        t = cfg.model.tiny
        return Shape(t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                     t.intermediate_size, t.vocab_size), "tiny (model.tiny)"
    local = Path(name).expanduser() / "config.json"
    path = local if local.is_file() else _hub_cache_config(name, env)
    if path is not None:
        try:
            return _shape_from_json(json.loads(path.read_text())), f"config.json: {path}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EstimateError(f"{path}: not a Llama-like config.json ({e.__class__.__name__}: {e})") from None
    if name in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name], f"builtin table ({name})"
    raise EstimateError(f"no shape for model {name!r}: not a local folder, not in the Hugging Face cache, not in "
                        f"the built-in table ({', '.join(BUILTIN_SHAPES)})")


# -- the rules --------------------------------------------------------------------------------


def precision(cfg: Config) -> str:
    """DeepSpeed's precision as `raydpo.train.deepspeed.resolve_precision` resolves it, or ``none``."""
    return resolve_precision(cfg, cfg.scaling.use_gpu) if cfg.deepspeed.enabled else "none"


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of the unquantized weights and the activations during training: a
    bf16/fp16 engine casts the whole module; otherwise quantized models are fp32 (PEFT's
    ``prepare_model_for_kbit_training`` upcasts the unquantized weights) and others ``model.dtype``."""
    p = precision(cfg)
    if p in ("bf16", "fp16"):
        return 2
    if cfg.quantization.mode != "none":
        return 4
    return DTYPE_BYTES[cfg.model.dtype]


def quantized_bytes_per_weight(mode: str, double_quant: bool) -> float:
    """4-bit: half a byte plus the absmax constants; 8-bit: 1 byte (scales added per row)."""
    if mode == "4bit":
        absmax = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK)) if double_quant else 4 / NF4_BLOCK
        return 0.5 + absmax
    if mode == "8bit":
        return 1.0
    raise ValueError(mode)


def base_weight_bytes(shape: Shape, cfg: Config) -> float:
    s, q = compute_bytes(cfg), cfg.quantization
    if q.mode == "none":
        return shape.params * s
    lin = shape.linear_params * quantized_bytes_per_weight(q.mode, q.double_quant)
    if q.mode == "8bit":
        lin += 4 * shape.layers * sum(out for _, out in shape.linears().values())
    return lin + shape.other_params * s


def lora_param_count(shape: Shape, cfg: Config) -> int:
    lin = shape.linears()
    r = cfg.lora.r
    return shape.layers * sum(r * (a + b) for name, (a, b) in lin.items() if name in cfg.lora.target_modules)


def tokens(cfg: Config) -> tuple[int, int, int]:
    """(T tokens, S scored positions, S' positions given logits) of one micro-batch (docstring)."""
    d, L, B = cfg.dpo, cfg.data.max_length, cfg.dpo.per_device_batch_size
    p = PROMPT_TOKENS
    T = B * (2 * L - p) if d.share_prefix else B * 2 * L
    S = B * 2 * (L - p)
    return T, S, (S if d.completion_only_logits else T)


def _attention_flops(cfg: Config, shape: Shape) -> float:
    """Causal attention matmuls (QK^T and AV) of one micro-batch's forward: 2·h·n² per layer per
    sequence of n tokens; with a shared prefix the rejected response re-reads the prompt only."""
    L, p, B = cfg.data.max_length, PROMPT_TOKENS, cfg.dpo.per_device_batch_size
    per_pair = (L * L + L * L - p * p) if cfg.dpo.share_prefix else 2 * L * L
    return 2.0 * shape.hidden * per_pair * B * shape.layers


def error_pct(estimate_: float, measured: float) -> float:
    """How far an estimate is from what was measured, in % of the measurement (the benchmarks'
    ``error_pct``; its target is |error_pct| <= 25)."""
    return 100 * (estimate_ - measured) / measured


def forward_flops(cfg: Config, shape: Shape) -> float:
    """FLOPs of one micro-batch's forward (``per_device_batch_size`` pairs): the reference's cost."""
    T, _, Sl = tokens(cfg)
    return 2.0 * shape.linear_params * T + _attention_flops(cfg, shape) + 2.0 * shape.hidden * shape.vocab * Sl


def step_flops(cfg: Config, shape: Shape) -> float:
    """FLOPs of one optimizer step on one worker (module docstring): the one formula for MFU."""
    T, _, Sl = tokens(cfg)
    N, A, head = shape.linear_params, _attention_flops(cfg, shape), 2.0 * shape.hidden * shape.vocab * Sl
    fwd = forward_flops(cfg, shape)
    bwd = 2.0 * N * T + 2 * A + head + 6.0 * lora_param_count(shape, cfg) * T
    recompute = (2.0 * N * T + A) if cfg.model.gradient_checkpointing else 0.0
    ref = fwd if (cfg.dpo.needs_reference and not cfg.dpo.precomputed_reference) else 0.0
    return (fwd + bwd + recompute + ref) * cfg.dpo.gradient_accumulation_steps


def _layer_saved_bytes(cfg: Config, shape: Shape, s: int) -> float:
    """Bytes one decoder layer keeps per token for its backward (no checkpointing)."""
    h, lin, targets = shape.hidden, shape.linears(), set(cfg.lora.target_modules)
    kv = ACT_KV if (cfg.dpo.padding_free and cfg.dpo.share_prefix) else ACT_KV - 1  # no k/v copies otherwise
    per = s * (ACT_H * h + kv * shape.kv_dim + ACT_I * shape.intermediate)
    per += 2 * h * (4 - s)  # the norms keep their inputs in fp32 (RMSNorm upcasts) when s < 4
    if cfg.lora.dropout > 0:  # PEFT: lora_A(dropout(x)): each adapter keeps its own dropped-out copy + bool mask
        per += sum((s + 1) * lin[t][0] for t in targets if t in lin)
    else:  # lora_A keeps its input, shared by the adapters on the same input
        inputs = {"q_proj": "y", "k_proj": "y", "v_proj": "y", "o_proj": "o", "gate_proj": "y2", "up_proj": "y2",
                  "down_proj": "m"}
        per += s * sum(lin[next(t for t in lin if inputs[t] == x)][0] for x in {inputs[t] for t in targets if t in lin})
    return per


@dataclass
class Estimate:
    shape_source: str
    shape: dict[str, Any]
    parts: dict[str, float]  # GiB, the keys of PARTS
    peak_memory_gib: float
    flops_per_step: float  # one worker, one optimizer step
    seconds_per_step: float | None
    seconds_per_epoch: float | None
    steps_per_epoch: float | None
    tokens_per_micro_batch: int
    scored_per_micro_batch: int
    world_size: int
    precision: str
    tflops: float | None
    gpu: str | None
    gpu_memory_gib: float | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passes: dict[str, Any] = field(default_factory=dict)  # `raydpo.orchestration.passes.Passes`
    rows_why: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


PARTS = ("base_weights", "lora_params", "lora_grads", "optimizer_states", "activations", "logits", "reference",
         "overhead")
FIT_KNOBS = ("dpo.per_device_batch_size (raise dpo.gradient_accumulation_steps to keep the global batch)",
             "data.max_length", "model.gradient_checkpointing=true", "deepspeed.stage=3 (shards the weights)",
             "deepspeed.offload_optimizer / offload_params", "quantization.mode=4bit")


def _head_bytes(cfg: Config, shape: Shape, s: int, Sl: int) -> tuple[float, float, float]:
    """The LM head's ``(kept for the backward, a forward's logits, peak)`` bytes (docstring)."""
    d, V = cfg.dpo, shape.vocab
    if d.completion_only_logits and d.fused_lm_head:
        kept = Sl * (s * shape.hidden + 8)
        tile = min(d.lm_head_tile_tokens, Sl) * V * 8
        return kept, tile, kept + tile
    rows = 1 if d.padding_free else (d.per_device_batch_size * (1 if d.share_prefix else 2))
    logits_fwd = Sl * V * (s + (4 if s != 4 else 0))  # the logits and their fp32 copy, in the forward
    saved_fp32 = Sl * V * 4  # what logsumexp keeps: the fp32 logits (or their fp32 copy)
    bwd = Sl * V * (s * min(rows, 2) + 4 * LOGIT_ROW_TEMPS / rows)
    return saved_fp32, logits_fwd, max(logits_fwd, saved_fp32 + bwd)


def memory_parts(cfg: Config, shape: Shape) -> dict[str, float]:
    """Per-worker peak memory in bytes, by part (module docstring)."""
    s, world, ds = compute_bytes(cfg), cfg.scaling.num_workers, cfg.deepspeed
    zero = ds.stage if ds.enabled else 0
    layer_w = s * sum(a * b for a, b in shape.linears().values())
    base = base_weight_bytes(shape, cfg)
    if zero == 3:
        base = (shape.other_params * s if ds.offload_params else base / world) + layer_w
    n_lora = lora_param_count(shape, cfg)
    params, grads = n_lora * s / (world if zero == 3 else 1), n_lora * s / (world if zero >= 2 else 1)
    master = zero >= 1 or precision(cfg) in ("bf16", "fp16")
    opt = 0.0 if ds.enabled and ds.offload_optimizer else n_lora * (8 + 4 * master) / (world if zero >= 1 else 1)
    T, S, Sl = tokens(cfg)
    h, i = shape.hidden, shape.intermediate
    # the peak is at the start of the backward, the logits' gradients beside everything saved; a
    # layer's backward comes after the logits' temporaries are freed: only its excess counts
    kept, logits_fwd, logits = _head_bytes(cfg, shape, s, Sl)
    layer = _layer_saved_bytes(cfg, shape, s) * T
    work = s * T * (WORK_H * h + WORK_I * i)
    if cfg.model.gradient_checkpointing:  # each layer's input, then one layer recomputed at a time
        saved, layer_peak = shape.layers * s * h * T, layer + work
    else:
        saved, layer_peak = shape.layers * layer, work
    # + the final norm's fp32 input, and the int64 [S', h] index transformers gathers the scored
    # positions' hidden states with (logits_to_keep as a tensor), kept for its backward
    acts = saved + 4 * h * T + (8 * h * S if cfg.dpo.completion_only_logits else 0) + max(0.0, layer_peak - logits)
    ref = 0.0
    if cfg.dpo.needs_reference and not cfg.dpo.precomputed_reference:
        # its no-grad logits + a layer's working set, beside what the policy's head keeps, before the backward
        ref = max(0.0, kept + logits_fwd + work - logits)
    overhead = 0.0
    if cfg.scaling.use_gpu:
        overhead = CUDA_CONTEXT_GIB * GIB
        if zero in (1, 2):
            overhead += REDUCE_BUCKET_SIZE * (4 if zero == 1 else s) * 2  # two buckets: overlap_comm on GPU
    return {"base_weights": base, "lora_params": params, "lora_grads": grads, "optimizer_states": opt,
            "activations": acts, "logits": logits, "reference": ref, "overhead": overhead}


# What a stop must leave a run (`ray job stop`'s RAY_JOB_STOP_WAIT_TIME_S, a pod's
# terminationGracePeriodSeconds): the step under way, then a checkpoint (a LoRA adapter and its
# optimizer shard, written and uploaded). Without a rate to size it: 300 s, what the shipped
# manifests and `raydpo submit` set (a 7B QLoRA step of the recipe runs well under a minute).
STOP_GRACE_S = 300
STEP_MFU_FLOOR = 0.2  # QLoRA reaches a fraction of the full rate: size the step at a fifth of it
SAVE_S = 60.0  # a LoRA checkpoint's write and upload, with room for a slow store


def stop_grace_s(seconds_per_step: float | None) -> int:
    """Seconds a stop must wait before SIGKILL for the run to finish its step and checkpoint."""
    if seconds_per_step is None:
        return STOP_GRACE_S
    return max(60, math.ceil((seconds_per_step / STEP_MFU_FLOOR + SAVE_S) / 30) * 30)


def estimate(cfg: Config, *, gpu: str | None = None, tflops: float | None = None,
             env: dict[str, str] | None = None) -> Estimate:
    shape, source = model_shape(cfg, env)
    gpu_name, g = find_gpu(gpu) if gpu else (None, None)
    rate = tflops if tflops is not None else (g.tflops if g else None)
    parts = {k: v / GIB for k, v in memory_parts(cfg, shape).items()}
    peak = sum(parts.values())
    flops = step_flops(cfg, shape)
    sec = flops / (rate * 1e12) if rate else None
    T, S, _ = tokens(cfg)
    notes = [f"tokens per micro-batch T={T} ({'B·(2L-p)' if cfg.dpo.share_prefix else 'B·2L'}), scored S={S} "
             f"(B·2(L-p)), p={PROMPT_TOKENS}: the longest pairs data.max_length allows",
             "peak = the sum of the parts, per worker"]
    if not cfg.scaling.use_gpu:
        notes.append("CPU: overhead 0, the Python/torch/DeepSpeed baseline of the process is not counted")
    if sec is None:
        notes.append("no rate given: pass --gpu NAME or --tflops X for seconds per step")
    else:
        notes.append(f"seconds at {rate:g} TFLOP/s, the full rate: a lower bound (QLoRA reaches a fraction)")
    steps = epoch = None
    rows, why = count_source_rows(cfg)
    passes = data_passes(cfg, rows, forward_flops(cfg, shape) / cfg.dpo.per_device_batch_size, rate)
    if rows is not None:
        pairs = rows * (1 - cfg.data.eval_fraction)
        steps = pairs / (cfg.dpo.per_device_batch_size * cfg.dpo.gradient_accumulation_steps * cfg.scaling.num_workers)
        epoch = steps * sec if sec is not None else None
        notes.append(f"epoch: {rows} rows ({why}) x (1 - eval_fraction) = {pairs:.0f} pairs, {steps:.1f} steps")
    else:
        notes.append(f"per-epoch time omitted: {why}")
    warnings = []
    if g is not None and peak > g.memory_gib:
        warnings.append(f"estimated peak {peak:.1f} GiB per worker exceeds {gpu_name}'s {g.memory_gib:g} GiB; "
                        f"knobs that lower it: {'; '.join(FIT_KNOBS)}")
    return Estimate(shape_source=source, shape=asdict(shape), parts=parts, peak_memory_gib=peak, flops_per_step=flops,
                    seconds_per_step=sec, seconds_per_epoch=epoch, steps_per_epoch=steps, tokens_per_micro_batch=T,
                    scored_per_micro_batch=S, world_size=cfg.scaling.num_workers, precision=precision(cfg),
                    tflops=rate, gpu=gpu_name, gpu_memory_gib=g.memory_gib if g else None, notes=notes,
                    warnings=warnings, passes=passes.to_json(), rows_why=why)


def format_estimate(e: Estimate) -> str:
    sh = e.shape
    lines = [f"shape: hidden {sh['hidden']}, layers {sh['layers']}, heads {sh['heads']} (kv {sh['kv_heads']}), "
             f"intermediate {sh['intermediate']}, vocab {sh['vocab']}  [{e.shape_source}]",
             f"per worker ({e.world_size} workers, precision {e.precision}):", "",
             "| part | GiB |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in e.parts.items()]
    lines.append(f"| **peak** | **{e.peak_memory_gib:.3f}** |")
    if e.gpu:
        lines.append(f"GPU {e.gpu}: {e.gpu_memory_gib:g} GiB, {e.tflops:g} TFLOP/s ({GPUS[e.gpu].source})")
    lines.append(f"FLOPs per optimizer step (one worker): {e.flops_per_step:.3e}")
    if e.seconds_per_step is not None:
        lines.append(f"seconds per step: {e.seconds_per_step:.3f}" + (
            f", per epoch: {e.seconds_per_epoch:.0f} ({e.steps_per_epoch:.1f} steps)" if e.seconds_per_epoch else ""))
    lines.append(f"stop grace: {stop_grace_s(e.seconds_per_step)} s (a step at {STEP_MFU_FLOOR:.0%} of the rate + "
                 f"{SAVE_S:.0f} s to save; the shipped {STOP_GRACE_S} s without a rate): what "
                 "RAY_JOB_STOP_WAIT_TIME_S and terminationGracePeriodSeconds must give a stopped run to checkpoint")
    lines += [s.replace("{workers}", str(e.world_size)) for s in format_passes(Passes(**e.passes), e.rows_why)]
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)
