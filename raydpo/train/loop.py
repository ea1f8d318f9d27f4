"""The SFT and DPO training loops as plain functions over batch iterators.

Nothing here imports Ray: `raydpo.train.worker` adapts Ray Train (dataset shards, report,
checkpoints) to these functions, and `raydpo.train.standalone` runs them under plain
``torchrun`` (how the GPU path is checked on machines without Ray). The loop reads top to
bottom: build engine → (resume) → step-0 sanity → train / log / eval / save → final save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raydpo import losses
from raydpo.config import Config, Stage, TrainStageConfig
from raydpo.data.collate import pair_tokens
from raydpo.loss_names import NLL_ONLY, reads_chosen_nll, step0_skip_reason
from raydpo.train.deepspeed import build_ds_config
from raydpo.metric_names import (EVAL_ACCURACY, LR, NONFINITE_STEPS, PADDING_FRACTION, PEAK_MEMORY_GB,
                                 PEAK_RSS_MIB, SAMPLES_PER_S, SCORED_TOKENS_PER_S, STEP_TIME, TOKENS_PER_S)
from raydpo.models.pairs import packed_attention, pair_logps, reference_logps
from raydpo.train import generate
from raydpo.train.faults import Faults
from raydpo.train.progress import format_progress



class SanityCheckError(RuntimeError):
    """The DPO step-0 loss was not what an untrained adapter must give."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or damaged."""


@dataclass
class WorkerEnv:
    """What a loop needs to know about where it runs."""

    rank: int
    world_size: int
    device: torch.device
    use_gpu: bool


@dataclass
class Hooks:
    """Side effects the loop asks for, supplied by the launcher (Ray or torchrun).

    ``train_batches(skip)`` returns this rank's micro-batches of the whole run, in the stream
    order of `raydpo.data.order`, from micro-batch ``skip`` on (a resumed run skips what it
    already trained on); ``eval_batches()`` a fresh iterator over this rank's eval shard; both
    yield collated batches (dicts of CPU tensors). ``report(metrics, ckpt_dir)`` is called on
    every rank the same number of times; ``log(metrics, step)`` only matters on rank 0.
    ``stop_requested()`` is this rank's view of a preemption (SIGTERM, or the driver's flag);
    the ranks agree on it through an all-reduce, so they checkpoint and stop at the same step.
    """

    train_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]
    eval_batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    report: Callable[[dict[str, float], str | None], None]
    log: Callable[[dict[str, float], int], None]
    resume_dir: str | None = None
    progress: Callable[[str], None] = print
    # Tune: report only results that carry eval metrics (what the scheduler ranks trials on)
    report_eval_only: bool = False
    stop_requested: Callable[[], bool] = lambda: False
    # saved in the checkpoint: a resumed run checks it was made by the same config
    config_fingerprint: dict[str, Any] = field(default_factory=dict)
    # injected faults (raydpo.train.faults): None reads $RAYDPO_FAULTS; where fired ones are marked
    faults: str | None = None
    faults_dir: str | None = None
    # eval generations (raydpo.train.generate): ``eval_prompts(k)`` the run's k fixed held-out
    # prompts, the same on every rank; ``log_generations(rows, step)`` only matters on rank 0
    eval_prompts: Callable[[int], list[dict[str, list[int]]]] = lambda k: []
    log_generations: Callable[[list[dict[str, Any]], int], None] = lambda rows, step: None


@dataclass
class LoopResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    preempted: bool = False


def lr_lambda(stage: TrainStageConfig) -> Callable[[int], float]:
    """Linear warmup then cosine / linear decay to 0 (or constant), as a LambdaLR factor."""

    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.lr_scheduler == "constant":
            return 1.0
        span = max(1, stage.max_steps - stage.warmup_steps)
        progress = min(1.0, (step - stage.warmup_steps) / span)
        if stage.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -- one step of each stage ------------------------------------------------------------------


def sft_forward(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal-LM loss on packed blocks. Returns (loss, metric sums incl. count)."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    loss = losses.sft_loss(out.logits, batch["labels"])
    n = batch["input_ids"].shape[0]
    sums = {"loss": loss.detach().float() * n, "count": torch.tensor(float(n), device=loss.device)}
    return loss, sums


def dpo_forward(engine, model, batch: dict[str, torch.Tensor], cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One policy forward over the pairs (`raydpo.models.pairs.pair_logps`, in whatever layout the collate
    made); the reference is precomputed log-probs carried in the batch, or the same weights with
    the LoRA adapter disabled (no second model in memory), or — for a reference-free loss
    (``cfg.dpo.needs_reference`` false: simpo, orpo, sft) — nothing at all: no reference forward,
    zeros in its place. Log-probs are fp32 sums; the loss gets the response lengths and averages
    per token where TRL 1.16 does."""
    d = cfg.dpo
    pol_c, pol_r, n_c, n_r = pair_logps(engine, batch, completion_only=d.completion_only_logits)
    if not d.needs_reference:  # the loss never reads them
        ref_c = ref_r = torch.zeros_like(pol_c)
    elif "ref_chosen_logps" in batch:  # precomputed sums (raydpo.orchestration.reference)
        ref_c, ref_r = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
    else:
        ref_c, ref_r = reference_logps(model, batch, completion_only=d.completion_only_logits, engine=engine)
    per_ex, chosen_r, rejected_r = losses.dpo_loss(
        pol_c, pol_r, ref_c, ref_r, beta=d.beta, loss_type=d.loss_types, label_smoothing=d.label_smoothing,
        chosen_lengths=n_c, rejected_lengths=n_r, loss_weights=d.loss_weights, simpo_gamma=d.simpo_gamma,
        cpo_alpha=d.cpo_alpha, discopop_tau=d.discopop_tau,
    )
    nll = losses.chosen_nll(pol_c.detach(), n_c) if reads_chosen_nll(d.loss_types, d.cpo_alpha) else None
    sums = losses.dpo_metric_sums(chosen_r, rejected_r, pol_c.detach(), pol_r.detach(), per_ex.detach(), nll=nll)
    return per_ex.mean(), sums


def _finalize(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """All-reduce metric sums across ranks, then divide: global means, not rank-0 means."""
    keys = sorted(sums)
    t = torch.stack([sums[k].detach().float().to(device).reshape(()) for k in keys])
    t = all_reduce_sum(t)
    return losses.finalize_metrics({k: t[i] for i, k in enumerate(keys)})


def _add(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        v = v.detach().float().reshape(())
        acc[k] = acc[k] + v if k in acc else v.clone()


# -- the loop ------------------------------------------------------------------------------


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op when its comm backend
    starts: gcc and ninja for ~45 s on 2 cores, once per machine and toolchain, for an op that only
    DeepSpeed's ``inference_all_reduce`` calls. raydpo never calls it (gradients are reduced through
    torch.distributed on gloo). DeepSpeed builds the op only when its table of compatible ops
    (``deepspeed.ops.__compatible_ops__``, probed on first read) says so: marking the op
    incompatible, before the first comm start in this process, leaves the table unprobed and the
    op unbuilt. On GPU the accelerator has no such op and this is not called."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})[ShareMemCommBuilder.NAME] = False


def build_engine(model, cfg: Config, stage_cfg: TrainStageConfig, env: WorkerEnv):
    """The engine over the trainable (LoRA) parameters with torch AdamW + LambdaLR: DeepSpeed's,
    or with ``deepspeed.enabled: false`` the plain torch one (`raydpo.train.plain`, DDP across
    ranks), which needs no DeepSpeed installed (imported only here, only when enabled)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: LoRA target_modules matched nothing?")
    opt = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage_cfg))
    if not cfg.deepspeed.enabled:
        from raydpo.train.plain import PlainEngine

        engine = PlainEngine(model, opt, sched, accum=stage_cfg.gradient_accumulation_steps,
                             max_grad_norm=stage_cfg.max_grad_norm, rank=env.rank, world_size=env.world_size,
                             device=env.device)
        return engine, opt, sched
    import deepspeed

    if not env.use_gpu:
        skip_cpu_shm_comm_op()
    ds_config = build_ds_config(cfg, stage_cfg, use_gpu=env.use_gpu, world_size=env.world_size)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, opt, sched


def checkpoint_score(stage: Stage, last_eval: dict[str, float]) -> float:
    """The number Ray keeps the best checkpoint by (higher is better): the latest eval reward
    accuracy for DPO, minus the latest eval loss for SFT. A checkpoint taken between evaluations
    carries the latest one; before the first, a floor (never missing, never NaN)."""
    key = EVAL_ACCURACY if stage == "dpo" else f"eval/{losses.LOSS}"
    if key not in last_eval or not math.isfinite(last_eval[key]):
        return SCORE_FLOOR
    return last_eval[key] if stage == "dpo" else -last_eval[key]


SCORE_FLOOR = -1e30
SCORE_KEY = "checkpoint_score"


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any."""
    t = all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device))
    return bool(t.item() > 0)


def _engine_skips_nonfinite(engine) -> bool:
    """ZeRO 1-3 drop a step whose gradient norm is not finite (the overflow path of fp16 loss
    scaling, also taken in fp32 and, with ``bf16.check_grad_overflow``, bf16): no optimizer or
    scheduler step, gradients cleared. Without ZeRO the loop must do it (`_discard_accumulated`)."""
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    return stage >= 1


def _discard_accumulated(engine, micro_done: int) -> None:
    """Without ZeRO: drop the gradients (plain ``p.grad``) a step accumulated before one of its
    micro-batches went non-finite, and rewind DeepSpeed's micro-step counter so the next step's
    accumulation boundary is where it was: weights, optimizer and scheduler stay untouched."""
    if micro_done == 0:
        return
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps -= micro_done


def run_stage(stage: Stage, cfg: Config, model, tokenizer, env: WorkerEnv, hooks: Hooks) -> LoopResult:
    """Train one stage to ``max_steps`` optimizer steps. ``model`` is the PEFT model."""
    stage_cfg = cfg.stage(stage)
    torch.manual_seed(stage_cfg.seed + env.rank)
    engine, _opt, sched = build_engine(model, cfg, stage_cfg, env)
    accum = stage_cfg.gradient_accumulation_steps
    faults = Faults(env.rank, hooks.faults, hooks.faults_dir)

    step, state = 0, {}
    if hooks.resume_dir:
        state = load_state(engine, hooks.resume_dir, env.rank)
        step = int(state["step"])
        hooks.progress(f"[{stage}] resumed from {hooks.resume_dir} at step {step}")

    def forward(batch):
        if stage == "sft":
            return sft_forward(engine, batch)
        return dpo_forward(engine, model, batch, cfg)

    def evaluate() -> dict[str, float]:
        engine.eval()
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, b in enumerate(hooks.eval_batches()):
                if stage_cfg.eval_max_batches is not None and i >= stage_cfg.eval_max_batches:
                    break
                _, s = forward(_to(b, env.device))
                _add(sums, s)
        engine.train()
        if not sums:
            return {}
        return {f"eval/{k}": v for k, v in _finalize(sums, env.device).items()}

    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = dict(state.get("last_eval", {}))
    nonfinite_total = int(state.get("nonfinite_steps", 0))
    nonfinite_run = int(state.get("nonfinite_run", 0))
    last_good = state.get("last_good_checkpoint_step")
    window: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), device=env.device)
    samples = torch.zeros((), device=env.device)  # pairs for DPO, packed blocks for SFT
    slots, pad, scored = (torch.zeros((), device=env.device) for _ in range(3))
    t_window, window_steps = time.perf_counter(), 0
    check_step0 = stage == "dpo" and cfg.dpo.sanity_check and step == 0
    if check_step0 and (why := step0_skip_reason(cfg.dpo.loss_types)):
        hooks.progress(f"[dpo] step-0 sanity check off: {why}")
        check_step0 = False
    batches = iter(hooks.train_batches(step * accum))
    preempted = False
    engine.train()
    while step < stage_cfg.max_steps:
        faults.before_step(step + 1)
        bad, discarded, done = False, False, 0
        skips_before = getattr(engine, "skipped_steps", 0)
        step_sums: dict[str, torch.Tensor] = {}
        step_counts = torch.zeros(5, device=env.device)  # tokens, samples, slots, pad, scored
        for micro in range(accum):
            try:
                raw = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training stream ended at step {step}: fewer micro-batches than "
                                   f"max_steps x gradient_accumulation_steps") from None
            if discarded:  # the rest of a skipped step's batches are consumed unseen
                continue
            b = _to(raw, env.device)
            with packed_attention(engine, b):  # checkpointed layers recompute in the backward
                loss, s = forward(b)
                if faults.nan_loss(step + 1, last_micro=micro == accum - 1):
                    loss = loss * float("nan")
                # every rank takes the same branch: backward and step are collective
                if _all_agree(not bool(torch.isfinite(loss.detach()).all()), env.device):
                    bad = True
                    if not _engine_skips_nonfinite(engine):
                        _discard_accumulated(engine, done)
                        discarded = True
                        continue
                    # ZeRO: the non-finite gradients reach DeepSpeed's overflow check, which drops the
                    # whole step (every micro-batch's gradients, no optimizer or scheduler step)
                engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            done += 1
            _add(step_sums, s)
            step_counts += torch.stack([
                (pair_tokens(b) if "pair_lengths" in b else b["attention_mask"].sum()).float(),
                s["count"].detach().float().reshape(()),
                *((torch.tensor(float(b["seq_ids"].numel()), device=env.device), (b["seq_ids"] < 0).sum().float(),
                   (b["score_slot"] >= 0).sum().float()) if "seq_ids" in b
                  else (torch.zeros((), device=env.device),) * 3)]).to(env.device)
        step += 1
        window_steps += 1
        # DeepSpeed also drops a step whose loss was finite but whose gradients were not
        skipped = bad or getattr(engine, "skipped_steps", 0) > skips_before
        if bad and not discarded and getattr(engine, "skipped_steps", 0) == skips_before:
            raise RuntimeError(f"{stage} step {step}: DeepSpeed applied an update although the loss was non-finite")
        if not skipped:  # a skipped step's batches count as consumed, not as trained on
            for k, v in step_sums.items():
                window[k] = window[k] + v if k in window else v
            tokens, samples = tokens + step_counts[0], samples + step_counts[1]
            slots, pad, scored = slots + step_counts[2], pad + step_counts[3], scored + step_counts[4]
        if skipped:
            nonfinite_total += 1
            nonfinite_run += 1
            hooks.progress(f"[{stage}] step {step}: non-finite loss or gradients; batch consumed, no update "
                           f"({nonfinite_run} in a row)")
            if nonfinite_run >= stage_cfg.max_nonfinite_steps:
                good = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was saved yet"
                raise NonFiniteError(
                    f"{stage}: {nonfinite_run} steps in a row had a non-finite loss (last at step {step}); {good}. "
                    f"Usual causes: a learning rate too high ({stage}.lr={stage_cfg.lr:g}), fp16 overflow "
                    "(use bf16), or bad rows in the data")
        else:
            nonfinite_run = 0
        if check_step0 and not skipped:
            sanity_check(_finalize(dict(window), env.device), cfg)
            check_step0 = False
        faults.after_step(step)
        stop = _all_agree(hooks.stop_requested(), env.device)
        last = step == stage_cfg.max_steps
        metrics: dict[str, float] = {}
        if step == 1 or step % stage_cfg.log_every == 0 or last or stop:
            elapsed = time.perf_counter() - t_window
            train = _finalize(window, env.device) if window else {}
            rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=env.device)
            totals = all_reduce_sum(torch.stack([tokens, samples, slots, pad, scored, rss]).float())
            metrics.update({f"train/{k}": v for k, v in train.items()})
            metrics[TOKENS_PER_S] = float(totals[0]) / max(elapsed, 1e-9)
            metrics[PEAK_RSS_MIB] = float(totals[5])  # all workers' high-water marks, summed
            if float(totals[2]) > 0:
                metrics[PADDING_FRACTION] = float(totals[3]) / float(totals[2])
                metrics[SCORED_TOKENS_PER_S] = float(totals[4]) / max(elapsed, 1e-9)
            metrics[SAMPLES_PER_S] = float(totals[1]) / max(elapsed, 1e-9)
            metrics[STEP_TIME] = elapsed / max(window_steps, 1)
            metrics[NONFINITE_STEPS] = float(nonfinite_total)
            if env.use_gpu:
                metrics[PEAK_MEMORY_GB] = torch.cuda.max_memory_allocated(env.device) / 2**30
            metrics[LR] = float(sched.get_last_lr()[0])
            window, t_window, window_steps = {}, time.perf_counter(), 0
            tokens, samples = torch.zeros((), device=env.device), torch.zeros((), device=env.device)
            slots, pad, scored = (torch.zeros((), device=env.device) for _ in range(3))
        if step % stage_cfg.eval_every == 0 or last:
            t_eval = time.perf_counter()
            ev = evaluate()
            last_eval.update(ev)
            metrics.update(ev)
            if stage == "dpo" and generate.due(cfg.generations, last):
                hooks.log_generations(generate.eval_generations(
                    model, tokenizer, hooks.eval_prompts(cfg.generations.num_prompts), cfg.generations, step=step,
                    seed=stage_cfg.seed, rank=env.rank, world_size=env.world_size, device=env.device), step)
            t_window += time.perf_counter() - t_eval  # eval time is not training throughput
        save = step % stage_cfg.save_every == 0 or last or stop
        if metrics:
            metrics["step"] = float(step)
            history.append(metrics)
            hooks.log({k: v for k, v in metrics.items() if k != "step"}, step)
            hooks.progress(format_progress(stage, step, stage_cfg.max_steps, metrics))
        if save or metrics:
            ckpt = None
            if save:
                ckpt = save_state(engine, model, tokenizer, step, stage, env, {
                    "micro_batches": step * accum, "last_eval": last_eval, "nonfinite_steps": nonfinite_total,
                    "nonfinite_run": nonfinite_run, "last_good_checkpoint_step": step,
                    "config": hooks.config_fingerprint, "preempted": stop and not last,
                })
                last_good = step
            report = {**metrics, "step": float(step), SCORE_KEY: checkpoint_score(stage, last_eval)}
            if stop and not last:
                report["preempted"] = 1.0
            if ckpt or not hooks.report_eval_only or any(k.startswith("eval/") for k in metrics):
                hooks.report(report, ckpt)
        if stop and not last:
            hooks.progress(f"[{stage}] stop requested (preemption): checkpointed at step {step} of "
                           f"{stage_cfg.max_steps}")
            preempted = True
            break
    return LoopResult(step=step, history=history, preempted=preempted)


def sanity_check(m: dict[str, float], cfg: Config) -> None:
    """At step 0 the fresh adapter makes policy == reference, so rewards are 0 and the loss is
    the loss type's value at zero margin (ln 2 for sigmoid; the weighted sum for a list). An
    ``sft`` term is left out: it is the base model's NLL, unknown in advance, so the check
    compares the preference part, ``loss - w_sft·nll_loss``. Not for simpo/orpo
    (`raydpo.loss_names.step0_skip_reason`)."""
    d = cfg.dpo
    terms = losses.loss_list(d.loss_types, d.loss_weights)
    pref = [(t, w) for t, w in terms if t not in NLL_ONLY]
    w_nll = sum(w for t, w in terms if t in NLL_ONLY)
    zero = torch.zeros(1)
    expected = float(losses.dpo_loss(zero, zero, zero, zero, beta=d.beta, loss_type=[t for t, _ in pref],
                                     loss_weights=[w for _, w in pref], label_smoothing=d.label_smoothing,
                                     discopop_tau=d.discopop_tau)[0].mean())
    loss = m["loss"] - w_nll * m.get(losses.NLL_LOSS, 0.0)
    what = "preference loss (loss minus the sft term)" if w_nll else "loss"
    rc, rr = m["rewards/chosen"], m["rewards/rejected"]
    if abs(loss - expected) > 0.01 or abs(rc) > 0.01 or abs(rr) > 0.01:
        raise SanityCheckError(
            f"DPO step-0 sanity check failed: {what} {loss:.4f} (expected {expected:.4f}), rewards/chosen {rc:.4f}, "
            f"rewards/rejected {rr:.4f} (expected ~0). The policy and the reference differ before training: "
            "likely the adapter is not freshly initialised (an SFT adapter passed as the DPO adapter instead of "
            "merged into the base?), precomputed reference log-probs come from another model or tokenizer, or "
            "dropout/precision differs between the two passes. Set dpo.sanity_check=false to run anyway."
        )


# -- checkpoints ---------------------------------------------------------------------------

ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_r{rank}.pt"
MANIFEST = "manifest_r{rank}.json"


def _rng_state() -> dict[str, Any]:
    import numpy as np

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, rank: int) -> None:
    """Last file a rank writes: the size and digest of every file it wrote. A checkpoint is
    complete only when every rank's manifest is there and matches (`verify_checkpoint`)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / f".{MANIFEST.format(rank=rank)}.tmp"
    tmp.write_text(json.dumps(files))
    os.replace(tmp, folder / MANIFEST.format(rank=rank))


def verify_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state (``trainer_state.json``) if every rank's files are present and
    intact, else `CheckpointError` naming what is wrong."""
    d = Path(ckpt_dir)
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: no readable {STATE_FILE} ({e.__class__.__name__})") from None
    for r in range(int(state.get("world_size", 1))):
        m = d / MANIFEST.format(rank=r)
        try:
            files = json.loads(m.read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"{d}: rank {r}'s manifest is missing or unreadable (a half-written checkpoint)") from None
        for name, want in files.items():
            p = d / name
            if not p.is_file() or p.stat().st_size != want["size"] or _sha256(p) != want["sha256"]:
                raise CheckpointError(f"{d}: {name} is missing or damaged")
    return state


def save_state(engine, model, tokenizer, step: int, stage: str, env: WorkerEnv, extra: dict[str, Any] | None = None) -> str:
    """Write this rank's part of a checkpoint into a fresh local folder and return it.

    Rank 0 writes the PEFT adapter + tokenizer (Hugging Face format, loadable as is) and the
    trainer state (step, data position, last eval, config fingerprint); every rank writes its
    DeepSpeed optimizer/scheduler shard, its RNG state and, last, a manifest of its files. Ray
    Train merges the ranks' folders into one checkpoint directory in storage; a checkpoint is
    only used when all the manifests are there and match (`verify_checkpoint`).
    """
    import tempfile

    out = Path(tempfile.mkdtemp(prefix=f"raydpo-{stage}-ckpt-{step}-r{env.rank}-"))
    engine.save_checkpoint(str(out / DS_DIR), tag="state", exclude_frozen_parameters=True,
                           client_state={"step": step})
    torch.save(_rng_state(), out / RNG_FILE.format(rank=env.rank))
    with gathered_adapter(model):
        if env.rank == 0:
            model.save_pretrained(str(out / ADAPTER_DIR))
            tokenizer.save_pretrained(str(out / ADAPTER_DIR))
            state = {"step": step, "stage": stage, "world_size": env.world_size, **(extra or {})}
            (out / STATE_FILE).write_text(json.dumps(state))
    _write_manifest(out, env.rank)
    return str(out)


def load_state(engine, ckpt_dir: str, rank: int = 0) -> dict[str, Any]:
    """Restore the DeepSpeed engine (LoRA weights, optimizer, scheduler) and this rank's RNG from
    a verified checkpoint; returns the trainer state."""
    state = verify_checkpoint(ckpt_dir)
    _, client = engine.load_checkpoint(
        str(Path(ckpt_dir) / DS_DIR), tag="state", load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if client is None:
        raise CheckpointError(f"could not load the engine state from {ckpt_dir} (a DeepSpeed checkpoint and a plain "
                              "one, deepspeed.enabled=false, do not resume each other)")
    rng = Path(ckpt_dir) / RNG_FILE.format(rank=rank)
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


class gathered_adapter:
    """Under ZeRO-3 the LoRA weights are partitioned; gather them (on every rank) to save."""

    def __init__(self, model):
        self.model = model
        self.ctx = None

    def __enter__(self):
        params = [p for p in self.model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
        if params:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def set_torch_threads(scaling) -> int:
    """A worker runs torch with as many threads as the CPUs it was given (at least 1), or
    ``scaling.torch_threads``. Ray only sets ``OMP_NUM_THREADS`` from the CPU request; say it
    here, once, where the loop runs, and report what torch got."""
    n = scaling.torch_threads or max(1, int(scaling.cpus_per_worker))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def env_from_torch(use_gpu: bool) -> WorkerEnv:
    """WorkerEnv from an initialised torch.distributed group (Ray Train or torchrun)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerEnv(rank=rank, world_size=world, device=device, use_gpu=use_gpu)
