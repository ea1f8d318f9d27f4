"""TRL's ``DPOTrainer`` on pre-tokenized pairs: the peer side of the side-by-side DPO benchmark.

    python -m raydpo.benchmarks.trl_peer --model-dir DIR --pairs pairs.json [--fastest] [--threads T] \\
        --steps 8 --batch-size 8 --max-length 256 --out-dir RUN_DIR --out result.json  (see --help)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node N -m raydpo.benchmarks.trl_peer ... \\
        --batch-size 8/N   # N DDP processes over gloo (CPU): accelerate reads torchrun's env

Trains LoRA-DPO with TRL 1.16's ``DPOTrainer`` on exactly the token sequences raydpo trains on
(``prompt_input_ids`` / ``chosen_input_ids`` / ``rejected_input_ids``, already BOS/EOS-complete and
within ``max_length``) and measures it the way raydpo's loop is measured. One call is one config;
run each config in its own process (the CLI) so that the peak RSS is that config's own.

Under ``torchrun`` every rank runs this module: ``--batch-size`` is per process (the global batch
is N times it, no gradient accumulation), each rank logs the batches it fed its model, and rank 0
gathers them (``all_gather_object`` over the gloo group), so the pairs and tokens of the timed
window, the identity check and the peak RSS (summed) cover every rank. Only rank 0 writes
``--out``. The pairs go to ``out_dir/pairs`` (``save_to_disk``, rank 0, before the others read
it): TRL's precompute writes its reference log-probs next to the dataset's files under a name
every rank agrees on, and an in-memory dataset gives each rank its own random temporary name, so
the other ranks would not find rank 0's file. One folder per call keeps a later call from reusing
an earlier call's cached reference (TRL's cache key is the dataset and weights' content).

How TRL 1.16 consumes the ids (read from ``trl/trainer/dpo_trainer.py``):

* ``DPOTrainer.__init__`` always calls ``self._prepare_dataset`` on a text dataset (it is skipped
  only for vision datasets, i.e. ones with an ``image``/``images`` column). ``_prepare_dataset``
  has no pre-tokenized path: it runs ``extract_prompt`` when there is no ``prompt`` column, appends
  the EOS *text* to ``chosen``/``rejected``, tokenizes ``prompt``, ``prompt+chosen`` and
  ``prompt+rejected`` with ``processing_class(text=...)`` and cuts the completion at the common
  prefix. Feeding it ids is impossible, and feeding it decoded text would re-tokenize (BPE merges
  across the prompt/response boundary, a second BOS, an EOS re-added from text), so the sequences
  would not be guaranteed to be raydpo's.
* What ``_prepare_dataset`` produces, and all the rest of the trainer reads, is three list columns
  ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: ``_set_signature_columns_if_needed`` keeps
  exactly those (plus ``ref_chosen_logps``/``ref_rejected_logps``), ``DataCollatorForPreference``
  builds the batch from them, and ``_precompute_ref_logps`` runs that collator over the dataset.
* So this module subclasses ``DPOTrainer`` and overrides only ``_prepare_dataset`` to return the
  dataset unchanged, with the ids put in those three columns. No decode, no re-tokenization, no
  EOS added; every other part (collator, precompute, loss, optimizer, logging) is TRL's own code.
  TRL's own post-tokenization filter (drop examples whose prompt alone fills ``max_length``) is
  replaced by an up-front check that every pair fits (it raises instead of dropping).
* ``DataCollatorForPreference.torch_call`` concatenates ``prompt_ids + chosen_ids`` and
  ``prompt_ids + rejected_ids``, truncates each to ``max_length`` (``truncation_mode`` keep_start:
  a no-op since every pair fits), right-pads with the tokenizer's pad id to the batch max
  (``pad_to_multiple_of`` None), stacks chosen rows then rejected rows (``[2B, T]``) and marks the
  response positions in ``completion_mask``. ``_compute_loss`` sets ``labels = input_ids`` where
  ``completion_mask`` else -100 and the fused LM head (``trl/trainer/utils.py``
  ``add_fused_lm_head``) scores ``labels[:, 1:]``, i.e. every response token (the prompt is never
  empty: it starts with BOS). The counts this module reports come from these very tensors.

Gotchas of TRL 1.16 handled here: ``bf16`` defaults to True (``_BaseConfig.__post_init__``) and
``gradient_checkpointing`` to True, so both are set explicitly; ``disable_dropout`` defaults to True
and zeroes every ``nn.Dropout`` including LoRA's, so ``lora_dropout`` only takes effect with
``disable_dropout=False``; the trainer mirrors the tokenizer's pad token onto the model config and
falls back to pad = EOS when the tokenizer has none (the tiny tokenizer has ``<pad>``); TRL sends
Hub telemetry from ``_BaseTrainer.__init__`` (disabled here: offline); with
``precompute_ref_log_probs`` the reference pass covers the *whole* dataset in ``__init__``
(``precompute_ref_batch_size`` defaults to the train batch size), whatever ``steps`` is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

_PAIR_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def _offline_env() -> None:
    """No hub, no telemetry. Effective only before ``huggingface_hub`` is imported, so the CLI calls
    it first; ``run_trl`` also switches the telemetry constant off in case it already was."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(k, "1")


def _check_pairs(pairs: list[dict], max_length: int) -> None:
    if not pairs:
        raise ValueError("no pairs")
    for i, p in enumerate(pairs):
        missing = [k for k in _PAIR_KEYS if k not in p]
        if missing:
            raise ValueError(f"pair {i} lacks {missing}")
        lp, lc, lr = (len(p[k]) for k in _PAIR_KEYS)
        if lp == 0 or lc == 0 or lr == 0:
            raise ValueError(f"pair {i}: empty prompt or response ({lp}, {lc}, {lr})")
        if lp + max(lc, lr) > max_length:
            # DataCollatorForPreference would cut it (keep_start): TRL would not see raydpo's tokens
            raise ValueError(f"pair {i}: prompt+response {lp + max(lc, lr)} > max_length {max_length}")


def _pair_tokens(p: dict) -> int:
    return 2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"])


def _inspect_batch(inputs: dict, by_seq: dict, pairs: list[dict], step: int) -> dict[str, Any]:
    """Counts and an identity check on one collated batch (``[2B, T]``: B chosen rows, then the B
    rejected rows of the same pairs). Cheap: B dict lookups on the attended prefixes."""
    import torch

    ids, am, cm = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    b = am.shape[0] // 2
    lens = am.sum(dim=1)
    # right padding: the attended positions of each row are exactly its first lens[j] positions
    contiguous = bool((am.bool() == (torch.arange(am.shape[1], device=am.device)[None] < lens[:, None])).all())
    lens = lens.tolist()
    rows = [tuple(ids[j, :n].tolist()) for j, n in enumerate(lens)]
    cms = [cm[j, :n].tolist() for j, n in enumerate(lens)]
    matched: list[int | None] = []
    for j in range(b):
        m = by_seq.get((rows[j], rows[j + b]))
        if m is not None:  # completion_mask must be 0 on the prompt, 1 on the whole response
            lp = len(pairs[m]["prompt_input_ids"])
            for row in (cms[j], cms[j + b]):
                if any(row[:lp]) or not all(row[lp:]):
                    m = None
        matched.append(m)
    return {
        "step": step,  # gradient_accumulation_steps == 1: one compute_loss per optimizer step
        "pairs": b,
        "input_tokens": int(am.sum()),
        # what the fused LM head scores: labels[:, 1:] != -100, labels = input_ids where completion_mask
        "scored_tokens": int(cm[:, 1:].sum()),
        "matched": matched,
        "contiguous": contiguous,
        # precomputed reference log-probs ride in the batch; without them TRL runs a reference forward
        "ref_in_batch": "ref_chosen_logps" in inputs,
    }


def _rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when started without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (one process: ``[obj]``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _load_model(model_dir: str, device: str, quant: str, bf16: bool):
    """(tokenizer, model) as TRL's user loads them: fp32 (or bf16) on ``device``, NF4 when ``quant``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if quant == "none":
        return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    from raydpo.config import QuantizationConfig
    from raydpo.models.factory import bnb_config, keep_bnb_cpu_layout

    qc = bnb_config(QuantizationConfig(mode=quant, quant_type="nf4", double_quant=False,
                                       compute_dtype="bfloat16" if bf16 else "float32"))
    return tokenizer, keep_bnb_cpu_layout(AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=qc, device_map={"": torch.device(device)}))


def _pairs_dataset(pairs: list[dict], folder: Path, args):
    """The pairs as the three id columns TRL reads, written to ``folder`` by the main process and
    read back by every rank (why on disk: the module docstring)."""
    from datasets import Dataset, load_from_disk

    with args.main_process_first(local=False, desc="pairs to disk"):
        if args.process_index == 0:
            if folder.exists():  # an earlier call's pairs would bring its cached reference log-probs along
                shutil.rmtree(folder)
            Dataset.from_list([
                {"prompt_ids": list(p["prompt_input_ids"]), "chosen_ids": list(p["chosen_input_ids"]),
                 "rejected_ids": list(p["rejected_input_ids"])} for p in pairs
            ]).save_to_disk(str(folder))
    return load_from_disk(str(folder))


def _trainer_class(by_seq: dict, pairs: list[dict], batch_log: list[dict[str, Any]]):
    """``DPOTrainer`` whose dataset preparation is the identity, logging each training batch."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """``DPOTrainer`` whose dataset preparation is the identity: the dataset already holds
        ``prompt_ids``/``chosen_ids``/``rejected_ids``, the format ``_prepare_dataset`` would produce."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = set(dataset.column_names)
            if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
                raise ValueError(f"{dataset_name} dataset must be pre-tokenized, got columns {sorted(cols)}")
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # the batch exactly as TRL's collator built it and the model gets it
                batch_log.append(_inspect_batch(inputs, by_seq, pairs, self.state.global_step + 1))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PreTokenizedDPOTrainer


def _timer(log_every: int, steps: int):
    """A callback taking ``perf_counter`` at step 1 and every ``log_every``-th step (raydpo's
    logging points) and the train loss TRL logs at those steps."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: dict[int, float] = {}
            self.losses: list[dict[str, float]] = []

        def on_step_end(self, args, state, control, **kw):
            s = state.global_step
            if s == 1 or s % log_every == 0 or s == steps:
                self.marks[s] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append({"step": state.global_step, "loss": float(logs["loss"])})

    return Timer()


def _window(marks: dict[int, float], logs_by_rank: list[list[dict]], pairs: list[dict]) -> dict[str, Any]:
    """Pairs, tokens and the identity check of the steady-state window (first mark, last mark],
    over every rank's batches."""
    (s_first, t_first), (s_last, t_last) = sorted(marks.items())[0], sorted(marks.items())[-1]
    window = [r for log in logs_by_rank for r in log if s_first < r["step"] <= s_last]
    matched = [m for r in window for m in r["matched"]]
    ok = [m for m in matched if m is not None]
    return {
        "first_step": s_first, "last_step": s_last, "seconds": t_last - t_first,
        "pairs": sum(r["pairs"] for r in window), "tokens": sum(r["input_tokens"] for r in window),
        "scored": sum(r["scored_tokens"] for r in window),
        "expected_tokens": sum(_pair_tokens(pairs[m]) for m in ok),
        "expected_scored": sum(len(pairs[m]["chosen_input_ids"]) + len(pairs[m]["rejected_input_ids"]) for m in ok),
        "matched": len(ok), "checked": len(matched),
        "identical": bool(matched) and len(ok) == len(matched) and all(r["contiguous"] for r in window),
        "ref_every_step": not all(r["ref_in_batch"] for r in window),
    }


def run_trl(model_dir: str, pairs: list[dict], *, fastest: bool, steps: int, batch_size: int, lr: float,
            beta: float, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules: list[str],
            max_length: int, log_every: int, seed: int, out_dir: str, disable_dropout: bool = True,
            device: str = "cpu", quant: str = "none", bf16: bool = False,
            gradient_checkpointing: bool | None = None, threads: int | None = None) -> dict:
    """Train TRL's ``DPOTrainer`` on ``pairs`` (pre-tokenized, see the module docstring) and measure it.

    ``fastest=True``: ``precompute_ref_log_probs=True, gradient_checkpointing=False`` (the reference
    pass runs once over the whole dataset before training). ``fastest=False``: TRL's defaults,
    gradient checkpointing on and a reference forward (adapter disabled) every step. Always fp32,
    CPU, LoRA, sigmoid loss, ``batch_size`` pairs per process without accumulation, no eval, no
    checkpoints; the final adapter goes to ``out_dir/adapter``. ``threads``: torch's intra-op
    threads per process (None: torch's default, or ``OMP_NUM_THREADS``). ``disable_dropout`` is
    TRL's own option (default True, which zeroes ``lora_dropout`` too). The GPU check
    (`raydpo.benchmarks.gpu_check`) sets ``device="cuda"``, ``quant="4bit"`` (raydpo's own
    `raydpo.models.factory.bnb_config`: NF4, no double quant, compute in bf16 when ``bf16``),
    ``bf16=True`` (TRL's autocast, bf16 weights) and ``gradient_checkpointing=True`` beside the
    precomputed reference; ``cuda_peak_gib`` is then ``torch.cuda.max_memory_allocated`` of the
    training (reset after the trainer is built: model load and reference precompute left out).

    Returns, on every rank, ``pairs_per_s``/``tokens_per_s`` (steady state: between the first and
    the last logged step, the first logged step being step 1, so the start-up before it is
    excluded; pairs and tokens of every rank), ``e2e_s`` (rank 0: model load + trainer build incl.
    TRL's reference precompute + training + adapter save; imports and process start are the
    caller's to time), ``peak_rss_mib`` (the processes' high-water marks, summed), ``losses`` (TRL's
    logged train loss per logged step), ``input_tokens_per_pair`` / ``scored_tokens_per_pair``
    (from the batches TRL fed the model in the timed window) next to the values expected from the
    ids, and a check that every row TRL fed is exactly one of the given sequences.
    """
    _check_pairs(pairs, max_length)
    if steps < 2:
        raise ValueError("steps must be >= 2 (the timed window starts after step 1)")
    _offline_env()
    import torch
    from peft import LoraConfig

    version = _checked_trl()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_seq = _seq_index(pairs)
    batch_log: list[dict[str, Any]] = []  # one entry per training compute_loss call (= optimizer step)

    # -- end-to-end clock starts: model load, trainer (TRL's reference precompute), train, save --
    t0 = time.perf_counter()
    tokenizer, model = _load_model(model_dir, device, quant, bf16)
    pad_before = tokenizer.pad_token
    if gradient_checkpointing is None:  # TRL's default, on, unless fastest
        gradient_checkpointing = not fastest
    args = _dpo_config(str(out / "trainer"), fastest=fastest, bf16=bf16, device=device, batch_size=batch_size,
                       steps=steps, lr=lr, beta=beta, seed=seed, disable_dropout=disable_dropout,
                       max_length=max_length, log_every=log_every, gradient_checkpointing=gradient_checkpointing)
    dataset = _pairs_dataset(pairs, out / "pairs", args)
    peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=list(target_modules), task_type="CAUSAL_LM")
    timer = _timer(log_every, steps)
    trainer = _trainer_class(by_seq, pairs, batch_log)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[timer])
    t_built = time.perf_counter()
    if device != "cpu":  # the training's peak, not the load's or the reference precompute's
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    t_trained = time.perf_counter()
    trainer.save_model(str(out / "adapter"))
    e2e = time.perf_counter() - t0

    return {"system": "trl", "trl_version": version, "fastest": fastest, "precompute_ref_log_probs": fastest,
            **_measured(trainer, timer, batch_log, pairs, device),
            "per_process_batch": batch_size,
            "e2e_s": e2e,
            "build_s": t_built - t0,  # incl. model load and, when fastest, the reference precompute
            "train_s": t_trained - t_built,
            "lora_dropout_effective": 0.0 if disable_dropout else lora_dropout,
            "pad_token": tokenizer.pad_token,
            "pad_token_changed_by_trl": tokenizer.pad_token != pad_before,
            "adapter_dir": str(out / "adapter")}


def _checked_trl() -> str:
    """TRL's version, after checking the private method this module overrides is still there;
    Hub telemetry off (the env vars come too late when the caller imported ``huggingface_hub``)."""
    from trl import DPOTrainer

    try:
        from huggingface_hub import constants as _hub_constants
        _hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    except Exception:  # pragma: no cover - best effort
        pass
    import trl

    if not callable(getattr(DPOTrainer, "_prepare_dataset", None)):
        raise RuntimeError(f"trl {trl.__version__}: DPOTrainer._prepare_dataset is gone; revisit trl_peer")
    if not trl.__version__.startswith("1.16."):
        import warnings
        warnings.warn(f"trl_peer was written against trl 1.16, found {trl.__version__}", stacklevel=3)
    return trl.__version__


def _seq_index(pairs: list[dict]) -> dict[tuple[tuple[int, ...], tuple[int, ...]], int]:
    """(prompt+chosen, prompt+rejected) -> pair index: each row pair the collator emits must be
    one of ours (hash lookups on the batch rows; no second pass over the data)."""
    by_seq: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for i, p in enumerate(pairs):
        pr = list(p["prompt_input_ids"])
        by_seq.setdefault((tuple(pr + list(p["chosen_input_ids"])), tuple(pr + list(p["rejected_input_ids"]))), i)
    return by_seq


def _dpo_config(output_dir: str, *, fastest: bool, bf16: bool, device: str, batch_size: int, steps: int,
                lr: float, beta: float, seed: int, disable_dropout: bool, max_length: int, log_every: int,
                gradient_checkpointing: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        # precision / device
        bf16=bf16, fp16=False, use_cpu=device == "cpu",
        # speed knobs under test
        precompute_ref_log_probs=fastest, gradient_checkpointing=gradient_checkpointing,
        # optimisation
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=lr, beta=beta, loss_type=["sigmoid"], seed=seed, data_seed=seed,
        disable_dropout=disable_dropout,
        # keep the sequences intact: no truncation (checked above), no packing, no extra padding
        max_length=max_length, truncation_mode="keep_start", padding_free=False, pad_to_multiple_of=None,
        # no eval, no checkpoints, no trackers, no progress bars
        eval_strategy="no", save_strategy="no", report_to=[], logging_steps=log_every,
        logging_first_step=False, disable_tqdm=True, dataloader_num_workers=0,
    )


def _measured(trainer, timer, batch_log: list[dict], pairs: list[dict], device: str) -> dict[str, Any]:
    """What the run measured, every rank's batches and peak RSS gathered (call on every rank)."""
    import torch

    base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
    ckpt_active = bool(getattr(base, "is_activation_checkpointing", None)
                       if hasattr(type(base), "is_activation_checkpointing") else base.is_gradient_checkpointing)
    rss = _gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)  # Linux: KiB
    w = _window(timer.marks, _gather(batch_log), pairs)
    dt, n, m = w["seconds"], w["pairs"], w["matched"]
    nan = float("nan")
    return {
        "gradient_checkpointing": ckpt_active,  # as found on the model after training
        "ref_forward_every_step": w["ref_every_step"],
        "processes": trainer.args.world_size,  # as the trainer saw it (DDP when > 1)
        "threads": torch.get_num_threads(),  # per process
        "pairs_per_s": n / dt if dt > 0 else nan,
        "tokens_per_s": w["tokens"] / dt if dt > 0 else nan,
        "window": {k: w[k] for k in ("first_step", "last_step", "seconds", "pairs", "tokens")},
        "peak_rss_mib": sum(rss),
        "peak_rss_mib_per_process": rss,
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None,
        "steps": int(trainer.state.global_step),
        "losses": timer.losses,
        "input_tokens_per_pair": w["tokens"] / n if n else nan,
        "scored_tokens_per_pair": w["scored"] / n if n else nan,
        "expected_input_tokens_per_pair": w["expected_tokens"] / m if m else nan,
        "expected_scored_tokens_per_pair": w["expected_scored"] / m if m else nan,
        "rows_identical": w["identical"],
        "rows_checked": w["checked"],
    }


def main(argv: list[str] | None = None) -> None:
    _offline_env()  # before anything imports huggingface_hub
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute and datasets' bars ignore disable_tqdm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--pairs", required=True, help="JSON list of {prompt,chosen,rejected}_input_ids dicts")
    p.add_argument("--fastest", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per process per step (under torchrun: global / N)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's own)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="TRL's disable_dropout (default on, as in TRL; it zeroes lora_dropout too)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quant", choices=["none", "4bit"], default="none",
                   help="4bit: NF4 (raydpo.models.factory.bnb_config)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and TRL's bf16 autocast")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: off with --fastest, on without (TRL's default)")
    p.add_argument("--out-dir", required=True, help="adapter and trainer output go here")
    p.add_argument("--out", required=True, help="result JSON (rank 0 writes it)")
    a = p.parse_args(argv)
    pairs = json.loads(Path(a.pairs).read_text())
    res = run_trl(a.model_dir, pairs, fastest=a.fastest, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                  beta=a.beta, lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                  target_modules=[m for m in a.target_modules.split(",") if m], max_length=a.max_length,
                  log_every=a.log_every, seed=a.seed, out_dir=a.out_dir, disable_dropout=a.disable_dropout,
                  device=a.device, quant=a.quant, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing,
                  threads=a.threads)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _rank()[0] != 0:
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    json.dump({k: v for k, v in res.items() if k != "losses"}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
    # out without the interpreter's teardown (like the ``raydpo`` command): under torchrun a rank's
    # teardown sometimes aborts in a C++ thread's destructor ("terminate called without an active
    # exception", SIGABRT) after its work is done and written, which torchrun reports as a failure
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
