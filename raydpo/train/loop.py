"""The SFT and DPO training loops as plain functions over batch iterators.

Nothing here imports Ray: `raydpo.train.worker` adapts Ray Train (dataset shards, report,
checkpoints) to these functions, and `raydpo.train.standalone` runs them under plain
``torchrun`` (how the GPU path is checked on machines without Ray). `run_stage` reads top to
bottom: `setup` (engine, resume), then per optimizer step `train_step` (its `micro_step`s), the
non-finite count, the step-0 sanity check, `maybe_log` / `maybe_eval` / `maybe_save`, until the
end or a preemption. Engines: `raydpo.train.engine`; checkpoint I/O: `raydpo.train.checkpoint`;
injected faults: `raydpo.train.faults`'s step hooks; a hung collective: `raydpo.train.hang`."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from raydpo import losses
from raydpo.config import Config, Stage, TrainStageConfig
from raydpo.data.collate import pair_tokens
from raydpo.loss_names import NLL_ONLY, reads_chosen_nll, step0_skip_reason
from raydpo.metric_names import (LR, NONFINITE_STEPS, PADDING_FRACTION, PEAK_MEMORY_GB, PEAK_RSS_MIB, SAMPLES_PER_S,
                                 SCORED_TOKENS_PER_S, STEP_TIME, TOKENS_PER_S)
from raydpo.models.factory import step0_dropout_reason
from raydpo.models.pairs import head_options, packed_attention, pair_logps, reference_logps
from raydpo.train import generate
from raydpo.train.checkpoint import SCORE_KEY, checkpoint_score, load_state, save_state
from raydpo.train.engine import Engine, WorkerEnv, build_engine, discard_accumulated
from raydpo.train.faults import StepHooks, step_hooks
from raydpo.train.hang import named_hang
from raydpo.train.progress import format_progress

Batch = dict[str, torch.Tensor]  # a collated micro-batch (`raydpo.data.collate`), on the device


class SanityCheckError(RuntimeError):
    """The DPO step-0 loss was not what an untrained adapter must give."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


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
    # injected faults (raydpo.train.faults), made into the loop's step hooks by `setup`: None
    # reads $RAYDPO_FAULTS; ``faults_dir`` is where fired ones are marked
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
    loss, n = losses.sft_loss(out.logits, batch["labels"]), batch["input_ids"].shape[0]
    sums = {"loss": loss.detach().float() * n, "count": torch.tensor(float(n), device=loss.device)}
    return loss, sums


def dpo_forward(engine, model, batch: dict[str, torch.Tensor], cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One policy forward over the pairs (`raydpo.models.pairs.pair_logps`, in whatever layout the collate
    made); the reference is precomputed log-probs carried in the batch, or the same weights with
    the LoRA adapter disabled or its frozen SFT copy (`raydpo.models.pairs.reference_disabled`),
    or — for a reference-free loss (``cfg.dpo.needs_reference`` false: simpo, orpo, sft) —
    nothing: zeros in its place. Log-probs are fp32 sums; the loss gets the response lengths and
    averages per token where TRL 1.16 does."""
    d = cfg.dpo
    pol_c, pol_r, n_c, n_r = pair_logps(engine, batch, **head_options(d))
    if not d.needs_reference:  # the loss never reads them
        ref_c = ref_r = torch.zeros_like(pol_c)
    elif "ref_chosen_logps" in batch:  # precomputed sums (raydpo.orchestration.reference)
        ref_c, ref_r = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
    else:
        ref_c, ref_r = reference_logps(model, batch, engine=engine, **head_options(d))
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


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any."""
    t = all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device))
    return bool(t.item() > 0)


@dataclass
class Counts:
    """Throughput counters of this rank, 0-dim float32 tensors on its device: tokens trained on,
    samples (pairs for DPO, packed blocks for SFT) and, for the layouts scored by index
    (``seq_ids``), the row slots, the padding among them and the scored tokens."""

    tokens: torch.Tensor
    samples: torch.Tensor
    slots: torch.Tensor
    pad: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> Counts:
        return cls(*(torch.zeros((), device=device) for _ in fields(cls)))

    @classmethod
    def of_batch(cls, b: Batch, sums: dict[str, torch.Tensor], device: torch.device) -> Counts:
        tokens = pair_tokens(b) if "pair_lengths" in b else b["attention_mask"].sum()
        if "seq_ids" in b:
            slots = torch.tensor(float(b["seq_ids"].numel()), device=device)
            pad, scored = (b["seq_ids"] < 0).sum(), (b["score_slot"] >= 0).sum()
        else:
            slots = pad = scored = torch.zeros((), device=device)
        return cls(*(t.float().reshape(()).to(device) for t in (tokens, sums["count"].detach(), slots, pad, scored)))

    def values(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Window:
    """Since the last log line: the sums and counters of the steps that updated, the steps run
    (skipped ones too), and when it opened (``perf_counter``; moved later by evaluation time)."""

    sums: dict[str, torch.Tensor]
    counts: Counts
    steps: int
    started: float

    @classmethod
    def open(cls, device: torch.device) -> Window:
        return cls({}, Counts.zeros(device), 0, time.perf_counter())

    def add_step(self, sums: dict[str, torch.Tensor], counts: Counts, skipped: bool) -> None:
        self.steps += 1
        if not skipped:  # a skipped step's batches count as consumed, not as trained on
            for k, v in sums.items():
                self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts.add(counts)


@dataclass
class RunState:
    """The loop's running state; a checkpoint saves its counters (not the history or the step-0
    flag) and a resumed run starts from them."""

    step: int = 0  # optimizer steps done
    last_eval: dict[str, float] = field(default_factory=dict)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # skipped steps in a row
    last_good: int | None = None  # the step of the last checkpoint
    check_step0: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LoopRun:
    """What the steps of one stage share: what trains and where, the hooks, the running state."""

    stage: Stage
    cfg: Config
    stage_cfg: TrainStageConfig
    model: Any  # the PEFT model
    tokenizer: Any
    engine: Engine
    sched: Any  # the LR scheduler: its last lr is logged
    env: WorkerEnv
    hooks: Hooks
    faults: StepHooks
    state: RunState
    window: Window
    # ZeRO 1-3 drop a step whose gradient norm is not finite (fp16's overflow path, also taken in
    # fp32 and, with ``bf16.check_grad_overflow``, bf16); without ZeRO the loop does (`train_step`)
    engine_skips_nonfinite: bool


# -- the loop ------------------------------------------------------------------------------


def setup(stage: Stage, cfg: Config, model, tokenizer, env: WorkerEnv, hooks: Hooks) -> LoopRun:
    """Seed, build the engine and the fault hooks, restore a checkpoint (engine, RNG, counters)
    when resuming, and decide on the DPO step-0 sanity check."""
    stage_cfg = cfg.stage(stage)
    torch.manual_seed(stage_cfg.seed + env.rank)
    engine, _opt, sched = build_engine(model, cfg, stage_cfg, env)
    faults = step_hooks(env.rank, hooks.faults, hooks.faults_dir)
    saved = load_state(engine, hooks.resume_dir, env.rank) if hooks.resume_dir else {}
    state = RunState(int(saved["step"]) if saved else 0, dict(saved.get("last_eval", {})),
                     int(saved.get("nonfinite_steps", 0)), int(saved.get("nonfinite_run", 0)),
                     saved.get("last_good_checkpoint_step"))
    if saved:
        hooks.progress(f"[{stage}] resumed from {hooks.resume_dir} at step {state.step}")
    state.check_step0 = stage == "dpo" and cfg.dpo.sanity_check and state.step == 0
    if state.check_step0 and (why := step0_skip_reason(cfg.dpo.loss_types) or step0_dropout_reason(cfg)):
        hooks.progress(f"[dpo] step-0 sanity check off: {why}")
        state.check_step0 = False
    return LoopRun(stage, cfg, stage_cfg, model, tokenizer, engine, sched, env, hooks, faults, state,
                    Window.open(env.device), engine_skips_nonfinite=engine.zero_optimization_stage() >= 1)


def run_stage(stage: Stage, cfg: Config, model, tokenizer, env: WorkerEnv, hooks: Hooks) -> LoopResult:
    """Train one stage to ``max_steps`` optimizer steps. ``model`` is the PEFT model."""
    run = setup(stage, cfg, model, tokenizer, env, hooks)
    st, max_steps = run.state, run.stage_cfg.max_steps
    batches = iter(hooks.train_batches(st.step * run.stage_cfg.gradient_accumulation_steps))
    run.engine.train()
    while st.step < max_steps:
        with named_hang(env.rank, st.step + 1, cfg.scaling.collective_timeout()):  # every step has collectives
            skipped = train_step(run, batches)
            st.step += 1
            count_nonfinite(run, skipped)
            maybe_check_step0(run, skipped)
            run.faults.after_step(st.step)
            stop = _all_agree(hooks.stop_requested(), env.device)
            last = st.step == max_steps
            metrics = maybe_log(run, stop, last)
            metrics.update(maybe_eval(run, last))
            publish(run, metrics)
            maybe_save(run, metrics, stop, last)
        if stop and not last:
            hooks.progress(f"[{stage}] stop requested (preemption): checkpointed at step {st.step} of {max_steps}")
            return LoopResult(step=st.step, history=st.history, preempted=True)
    return LoopResult(step=st.step, history=st.history)


def _forward(run: LoopRun, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if run.stage == "sft":
        return sft_forward(run.engine, batch)
    return dpo_forward(run.engine, run.model, batch, run.cfg)


def micro_step(run: LoopRun, b: Batch, step: int, last_micro: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward, backward and engine step of micro-batch ``b`` (on the device) of optimizer step
    ``step``. Returns its metric sums and whether its loss was finite on every rank; a non-finite
    one gets no backward and no engine step unless the engine drops the step itself (ZeRO)."""
    with packed_attention(run.engine, b):  # checkpointed layers recompute in the backward
        loss, sums = _forward(run, b)
        loss = run.faults.loss(loss, step, last_micro)
        # every rank takes the same branch: backward and step are collective
        finite = not _all_agree(not bool(torch.isfinite(loss.detach()).all()), run.env.device)
        if not finite and not run.engine_skips_nonfinite:
            return sums, False
        # under ZeRO the non-finite gradients reach DeepSpeed's overflow check, which drops the
        # whole step (every micro-batch's gradients, no optimizer or scheduler step)
        run.engine.backward(loss)
    run.engine.step()  # DeepSpeed only updates at the accumulation boundary
    return sums, finite


def train_step(run: LoopRun, batches: Iterator[Batch]) -> bool:
    """Optimizer step ``state.step + 1``: one `micro_step` per accumulated micro-batch, added to
    the window. After a non-finite loss without ZeRO, the step's gradients are dropped and its
    remaining batches consumed unseen; under ZeRO DeepSpeed drops the step (also one whose
    gradients alone were not finite). Returns whether the step was skipped (no update)."""
    engine, device, step = run.engine, run.env.device, run.state.step + 1
    accum = run.stage_cfg.gradient_accumulation_steps
    run.faults.before_step(step)
    sums: dict[str, torch.Tensor] = {}
    counts = Counts.zeros(device)
    skips_before, done, bad, discarded = engine.skipped_steps, 0, False, False
    for micro in range(accum):
        if (raw := next(batches, None)) is None:
            raise RuntimeError(f"the training stream ended at step {run.state.step}: fewer micro-batches than "
                               "max_steps x gradient_accumulation_steps")
        if discarded:  # the rest of a skipped step's batches are consumed unseen
            continue
        b = _to(raw, device)
        micro_sums, finite = micro_step(run, b, step, last_micro=micro == accum - 1)
        bad = bad or not finite
        if not finite and not run.engine_skips_nonfinite:
            discard_accumulated(engine, done)
            discarded = True
            continue
        done += 1
        _add(sums, micro_sums)
        counts.add(Counts.of_batch(b, micro_sums, device))
    dropped = engine.skipped_steps > skips_before
    if bad and not discarded and not dropped:
        raise RuntimeError(f"{run.stage} step {step}: DeepSpeed applied an update although the loss was non-finite")
    run.window.add_step(sums, counts, skipped=bad or dropped)
    return bad or dropped


def count_nonfinite(run: LoopRun, skipped: bool) -> None:
    """Count a skipped step; ``max_nonfinite_steps`` in a row stop the stage (`NonFiniteError`)."""
    st, stage, stage_cfg = run.state, run.stage, run.stage_cfg
    if not skipped:
        st.nonfinite_run = 0
        return
    st.nonfinite_total += 1
    st.nonfinite_run += 1
    run.hooks.progress(f"[{stage}] step {st.step}: non-finite loss or gradients; batch consumed, no update "
                       f"({st.nonfinite_run} in a row)")
    if st.nonfinite_run >= stage_cfg.max_nonfinite_steps:
        good = f"the last good checkpoint is step {st.last_good}" if st.last_good else "no checkpoint was saved yet"
        raise NonFiniteError(
            f"{stage}: {st.nonfinite_run} steps in a row had a non-finite loss (last at step {st.step}); {good}. "
            f"Usual causes: a learning rate too high ({stage}.lr={stage_cfg.lr:g}), fp16 overflow "
            "(use bf16), or bad rows in the data")


def maybe_check_step0(run: LoopRun, skipped: bool) -> None:
    """The DPO step-0 sanity check (`sanity_check`) on the first step that updated."""
    if run.state.check_step0 and not skipped:
        sanity_check(_finalize(dict(run.window.sums), run.env.device), run.cfg)
        run.state.check_step0 = False


def maybe_log(run: LoopRun, stop: bool, last: bool) -> dict[str, float]:
    """On the first step, every ``log_every``, the last and a stop: the window's train metrics
    (means over every rank's samples) and throughput (summed over ranks); a new window opens."""
    step, env, window = run.state.step, run.env, run.window
    if not (step == 1 or step % run.stage_cfg.log_every == 0 or last or stop):
        return {}
    elapsed = time.perf_counter() - window.started
    train = _finalize(window.sums, env.device) if window.sums else {}
    rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=env.device)
    summed = all_reduce_sum(torch.stack([*window.counts.values(), rss]).float())
    total = Counts(*summed[:len(fields(Counts))])
    metrics = {f"train/{k}": v for k, v in train.items()}
    metrics[TOKENS_PER_S] = float(total.tokens) / max(elapsed, 1e-9)
    metrics[PEAK_RSS_MIB] = float(summed[5])  # all workers' high-water marks, summed
    if float(total.slots) > 0:
        metrics[PADDING_FRACTION] = float(total.pad) / float(total.slots)
        metrics[SCORED_TOKENS_PER_S] = float(total.scored) / max(elapsed, 1e-9)
    metrics[SAMPLES_PER_S] = float(total.samples) / max(elapsed, 1e-9)
    metrics[STEP_TIME] = elapsed / max(window.steps, 1)
    metrics[NONFINITE_STEPS] = float(run.state.nonfinite_total)
    if env.use_gpu:
        metrics[PEAK_MEMORY_GB] = torch.cuda.max_memory_allocated(env.device) / 2**30
    metrics[LR] = float(run.sched.get_last_lr()[0])
    run.window = Window.open(env.device)
    return metrics


def evaluate(run: LoopRun) -> dict[str, float]:
    """``eval/`` metrics over every rank's eval shard (at most ``eval_max_batches`` each)."""
    engine, env, max_batches = run.engine, run.env, run.stage_cfg.eval_max_batches
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, b in enumerate(run.hooks.eval_batches()):
            if max_batches is not None and i >= max_batches:
                break
            _, s = _forward(run, _to(b, env.device))
            _add(sums, s)
    engine.train()
    if not sums:
        return {}
    return {f"eval/{k}": v for k, v in _finalize(sums, env.device).items()}


def maybe_eval(run: LoopRun, last: bool) -> dict[str, float]:
    """Every ``eval_every`` steps and the last: the eval metrics and, for DPO when due, the eval
    generations (`raydpo.train.generate`) handed to ``hooks.log_generations``."""
    step, cfg, env = run.state.step, run.cfg, run.env
    if not (step % run.stage_cfg.eval_every == 0 or last):
        return {}
    t_eval = time.perf_counter()
    ev = evaluate(run)
    run.state.last_eval.update(ev)
    if run.stage == "dpo" and generate.due(cfg.generations, last):
        prompts = run.hooks.eval_prompts(cfg.generations.num_prompts)
        run.hooks.log_generations(generate.eval_generations(
            run.model, run.tokenizer, prompts, cfg.generations, step=step, seed=run.stage_cfg.seed,
            rank=env.rank, world_size=env.world_size, device=env.device), step)
    run.window.started += time.perf_counter() - t_eval  # eval time is not training throughput
    return ev


def publish(run: LoopRun, metrics: dict[str, float]) -> None:
    """A step's metrics, if any, to the history, the logger and rank 0's progress line."""
    if not metrics:
        return
    step = run.state.step
    metrics["step"] = float(step)
    run.state.history.append(metrics)
    run.hooks.log({k: v for k, v in metrics.items() if k != "step"}, step)
    run.hooks.progress(format_progress(run.stage, step, run.stage_cfg.max_steps, metrics))


def maybe_save(run: LoopRun, metrics: dict[str, float], stop: bool, last: bool) -> None:
    """Every ``save_every`` steps, the last and on a stop: this rank's part of a checkpoint, with
    the trainer state a resumed run needs. A step with metrics or a checkpoint is reported (on
    every rank alike), except, under ``report_eval_only``, one with neither eval metrics nor a
    checkpoint."""
    st, hooks = run.state, run.hooks
    save = st.step % run.stage_cfg.save_every == 0 or last or stop
    if not (save or metrics):
        return
    ckpt = None
    if save:
        ckpt = save_state(run.engine, run.model, run.tokenizer, st.step, run.stage, run.env, {
            "micro_batches": st.step * run.stage_cfg.gradient_accumulation_steps, "last_eval": st.last_eval,
            "nonfinite_steps": st.nonfinite_total, "nonfinite_run": st.nonfinite_run,
            "last_good_checkpoint_step": st.step, "config": hooks.config_fingerprint, "preempted": stop and not last,
        })
        st.last_good = st.step
    report = {**metrics, "step": float(st.step), SCORE_KEY: checkpoint_score(run.stage, st.last_eval)}
    if stop and not last:
        report["preempted"] = 1.0
    if ckpt or not hooks.report_eval_only or any(k.startswith("eval/") for k in metrics):
        hooks.report(report, ckpt)


def sanity_check(m: dict[str, float], cfg: Config) -> None:
    """At step 0 policy == reference (a fresh adapter, or the SFT adapter and its frozen copy), so
    rewards are 0 and the loss is the loss type's value at zero margin (ln 2 for sigmoid; the
    weighted sum for a list). An ``sft`` term is left out: it is the base model's NLL, unknown in
    advance, so the check compares the preference part, ``loss - w_sft·nll_loss``. Not for
    simpo/orpo (`raydpo.loss_names.step0_skip_reason`) nor with the SFT adapter's dropout
    (`raydpo.models.factory.step0_dropout_reason`)."""
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
            "likely the adapter is neither fresh nor the reference's own copy (an SFT adapter passed as the DPO "
            "adapter, not as dpo.sft_adapter?), precomputed reference log-probs come from another model or "
            "tokenizer, or dropout/precision differs between the two passes. Set dpo.sanity_check=false to run anyway."
        )
