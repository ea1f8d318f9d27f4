"""``raydpo tune``: a Ray Tune search over DPO beta and learning rate (driver side).

Ray 2.60 is Train V2: each trial is a function that builds and fits its own `TorchTrainer`
(through `raydpo.orchestration.launch.fit_stage`) with `TuneReportCallback`, so every ``ray.train.report``
— one per evaluation — reaches Tune and the ASHA scheduler. The reference log-probs are
computed once before the search (`raydpo.orchestration.reference`) and every trial reads them; a
reference-free loss (simpo, orpo, sft: `DPOConfig.needs_reference`) has no reference pass at all.
MLflow: a parent run for the search, one child run per trial, the best trial tagged and its
adapter registered in the Model Registry with lineage tags.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from raydpo.config import Config, SearchSpace
from raydpo.tracking.terminal import echo
from raydpo.metric_names import EVAL_ACCURACY, EVAL_MARGINS
from raydpo.tracking.trials import BEST_TAG, TRIAL_TAG, TrialRow



def _space(s: SearchSpace):
    from ray import tune

    if s.kind == "loguniform":
        return tune.loguniform(s.low, s.high)
    if s.kind == "uniform":
        return tune.uniform(s.low, s.high)
    if s.kind == "choice":
        return tune.choice(list(s.values))
    return tune.grid_search(list(s.values))


def max_concurrent(cfg: Config) -> int:
    """As many trials as the cluster fits while Ray Data keeps its CPUs."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    s = cfg.scaling
    return max(1, s.slots(ray.cluster_resources(), s.trainer_resources()))


def _trial(config: dict[str, Any], datasets: tuple[Any, Any] | None = None, *, base_cfg: dict, base: tuple[str, str],
           parent_run_id: str) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydpo.orchestration.launch import fit_stage

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = Config.from_dict(base_cfg).with_overrides({
        "dpo.beta": float(config["beta"]), "dpo.lr": float(config["lr"]),
        "run.name": f"{base_cfg['run']['name']}-trial-{trial_id}",
        "tracking.run_name": f"trial-{trial_id}",
    })
    fit_stage(cfg, "dpo", parent_run_id=parent_run_id, base=base, datasets=datasets, callbacks=[TuneReportCallback()],
              report_eval_only=True,
              tags={TRIAL_TAG: trial_id},
              params={"beta": str(cfg.dpo.beta), "lr": str(cfg.dpo.lr), "trial_id": trial_id})


def run_tune(cfg: Config, *, resume: bool = False, progress=echo) -> tuple[list[TrialRow], TrialRow | None]:
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raydpo import tracking
    from raydpo.orchestration.launch import check_cpu_budget, merged_sft_base, resolve_base, stage_datasets
    from raydpo.orchestration.ray_connect import ensure_ray

    from raydpo.orchestration.launch import preflight

    preflight(cfg)
    ensure_ray()
    check_cpu_budget(cfg)
    t = cfg.tune
    # trials report to Tune only at evaluations; checkpoints land on evaluation steps too
    ev = cfg.dpo.eval_every
    overrides: dict[str, Any] = {"dpo.log_every": ev, "dpo.save_every": max(ev, cfg.dpo.save_every // ev * ev)}
    if t.shared_reference:
        overrides["dpo.reference"] = "precomputed"
    # trials run in their own trial folder: give them absolute paths and the driver's MLflow store
    overrides["tracking.tracking_uri"] = tracking.resolve_tracking_uri(cfg.tracking)
    cfg = cfg.with_absolute_paths().with_overrides(overrides)
    base_path, tok_path = resolve_base(cfg)
    if cfg.dpo.sft_adapter:
        base_path = tok_path = merged_sft_base(cfg, cfg.dpo.sft_adapter, base_path)
    t0 = time.perf_counter()
    datasets = stage_datasets(cfg, "dpo", base_path, tok_path, progress)
    ref_s = time.perf_counter() - t0
    if datasets[1] is None:
        raise ValueError(f"the eval split is empty: Tune ranks trials on {t.metric}; raise data.eval_fraction")
    shared = None
    if t.share_data:
        # every trial would otherwise start its own Ray Data read (+ tokenization when the reference
        # is not shared) of the same pairs: ~25 s of a trial's start-up on 2 cores
        shared = tuple(ds.materialize() for ds in datasets)
        need = cfg.dpo.per_device_batch_size * cfg.scaling.num_workers
        if shared[0].count() < need:
            from raydpo.orchestration.launch import DataError

            raise DataError(f"tune: {shared[0].count()} training pairs remain after filtering and the eval split, fewer "
                            f"than one batch per worker ({cfg.scaling.num_workers} workers x "
                            f"{cfg.dpo.per_device_batch_size} = {need}); add data or lower the batch size")
        progress(f"[tune] {shared[0].count()} train / {shared[1].count()} eval pairs materialized once for every "
                 f"trial in {time.perf_counter() - t0 - ref_s:.0f}s")

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    exp_id = tracking.setup_experiment(uri, cfg.tracking.experiment_name)
    name = f"{cfg.run.name}-tune"
    parent = _find_parent(uri, cfg.tracking.experiment_name, name) if resume else None
    if parent is None:
        sft_run = tracking.run_for_adapter(uri, cfg.tracking.experiment_name, cfg.dpo.sft_adapter) if cfg.dpo.sft_adapter else None
        parent = tracking.start_run(uri, exp_id, name, tags={tracking.STAGE_TAG: "tune", tracking.SFT_RUN_TAG: sft_run or "",
                                                             "raydpo.sft_adapter": cfg.dpo.sft_adapter or ""})
        tracking.log_params(uri, parent, cfg.flat())
    ready = (f"reference log-probs ready in {ref_s:.0f}s" if cfg.dpo.precomputed_reference
             else f"no reference pass ({'/'.join(cfg.dpo.loss_types)} reads no reference)" if not cfg.dpo.needs_reference
             else "a reference forward in every trial step (dpo.reference=adapter_disabled)")
    progress(f"[tune] MLflow parent run {parent}; {ready}")

    n_evals = math.ceil(cfg.dpo.max_steps / cfg.dpo.eval_every)
    scheduler = None if t.scheduler == "fifo" else ASHAScheduler(metric=t.metric, mode="max", time_attr="training_iteration",
                              # past the last evaluation: a trial that runs to the end finishes on its
                              # own (ends its MLflow run, logs its adapter) instead of being stopped
                              max_t=n_evals + 1,
                              grace_period=min(t.grace_period, n_evals), reduction_factor=t.reduction_factor)
    search_alg = None
    if t.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise RuntimeError("tune.searcher=optuna needs `pip install optuna`") from e
        search_alg = OptunaSearch(metric=t.metric, mode="max")
    fn = partial(_trial, base_cfg=cfg.to_dict(), base=(base_path, tok_path), parent_run_id=parent)
    if shared is not None:
        fn = tune.with_parameters(fn, datasets=shared)  # the object store holds the blocks once
    # the trial only drives its TorchTrainer; CPUs stay with Ray Data
    trainable = tune.with_resources(fn, {"CPU": 0, "memory": 1})
    storage = str(Path(cfg.run.storage_path).resolve())
    path = f"{storage}/{name}"
    if resume and tune.Tuner.can_restore(path):
        progress(f"[tune] resuming {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"beta": _space(t.beta), "lr": _space(t.lr)},
            tune_config=tune.TuneConfig(num_samples=t.num_samples, scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=max_concurrent(cfg)),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        )
    grid = tuner.fit()
    rows = _rows(grid, cfg.dpo.max_steps, uri, cfg.tracking.experiment_name, parent)
    scored = [r for r in rows if not math.isnan(r.score(t.metric))]
    # the best finished trial (it has an adapter to register); a stopped one only if none finished
    best = max([r for r in scored if r.status == "DONE"] or scored,
               key=lambda r: r.score(t.metric), default=None)
    _finish(uri, parent, cfg, rows, best, t.metric)
    return rows, best


def _find_parent(uri: str, experiment: str, name: str) -> str | None:
    """The newest search parent run called ``name`` (what ``--resume`` continues)."""
    from raydpo import tracking

    hits = [r for r in tracking.find_runs(uri, experiment) or []
            if r.info.run_name == name and r.data.tags.get(tracking.STAGE_TAG) == "tune"]
    return hits[-1].info.run_id if hits else None


def _rows(grid, max_steps: int, uri: str, experiment: str, parent: str) -> list[TrialRow]:
    from raydpo import tracking

    runs = tracking.find_runs(uri, experiment) or []
    by_trial = {r.data.tags[TRIAL_TAG]: (r.info.run_id, r.info.status) for r in runs
                if r.data.tags.get(tracking.PARENT_TAG) == parent and TRIAL_TAG in r.data.tags}
    rows = []
    for res in grid:
        m, c = res.metrics or {}, res.config or {}
        steps = int(m.get("step", 0))
        tid = str(m.get("trial_id", ""))
        run_id, run_status = by_trial.get(tid, (None, None))
        # DONE = the trial's driver finished its stage (adapter logged, run FINISHED). ASHA can stop a
        # trial at its last evaluation too: it then has every step but was killed before finishing.
        done = run_status == "FINISHED" if run_status else steps >= max_steps
        status = "ERROR" if res.error else ("DONE" if done else "STOPPED")
        rows.append(TrialRow(trial_id=tid, beta=float(c.get("beta", math.nan)), lr=float(c.get("lr", math.nan)),
                             accuracy=float(m.get(EVAL_ACCURACY, math.nan)),
                             margins=float(m.get(EVAL_MARGINS, math.nan)),
                             steps=steps, status=status, run_id=run_id))
    return rows


def format_table(rows: list[TrialRow], best: TrialRow | None) -> str:
    lines = [f"{'trial':<12} {'beta':>8} {'lr':>10} {'eval acc':>9} {'margins':>9} {'steps':>6}  status"]
    for r in sorted(rows, key=lambda r: (-(r.accuracy if not math.isnan(r.accuracy) else -1), r.trial_id)):
        star = "  <- best" if best is not None and r.trial_id == best.trial_id else ""
        lines.append(f"{r.trial_id:<12} {r.beta:>8.4f} {r.lr:>10.2e} {r.accuracy:>9.4f} {r.margins:>9.4f} "
                     f"{r.steps:>6}  {r.status}{star}")
    return "\n".join(lines)


def _finish(uri: str, parent: str, cfg: Config, rows: list[TrialRow], best: TrialRow | None, metric: str) -> None:
    import tempfile

    from raydpo import tracking
    from raydpo.tracking.plots import trials_scatter

    client = tracking._client(uri)
    for r in rows:
        if not r.run_id or r.status == "DONE":
            continue
        status = client.get_run(r.run_id).info.status
        # ASHA stopped it: its driver was killed before ending the run, or saw the stop as a failure
        if r.status == "STOPPED" and status in ("RUNNING", "FAILED"):  # RUNNING: stopped at its last evaluation
            tracking.end_run(uri, r.run_id, "KILLED")
        elif status == "RUNNING":
            tracking.end_run(uri, r.run_id, "FAILED")
    with tempfile.TemporaryDirectory() as tmp:
        png = trials_scatter(rows, metric, best)
        if png is not None:
            (Path(tmp) / "trials.png").write_bytes(png)
            client.log_artifact(parent, str(Path(tmp) / "trials.png"))
        (Path(tmp) / "trials.txt").write_text(format_table(rows, best) + "\n")
        client.log_artifact(parent, str(Path(tmp) / "trials.txt"))
    if best is not None and best.run_id:
        client.set_tag(best.run_id, BEST_TAG, "true")
        client.set_tag(parent, "raydpo.best_run_id", best.run_id)
        client.log_metric(parent, f"best/{metric}", best.score(metric))
        if best.status == "DONE":
            name = cfg.tracking.register_model_name or f"{cfg.tracking.experiment_name}-dpo"
            sft_run = client.get_run(parent).data.tags.get(tracking.SFT_RUN_TAG, "")
            version = tracking.register_model(uri, best.run_id, "adapter", name, tags={
                "raydpo.tune_parent_run_id": parent, "raydpo.trial_run_id": best.run_id,
                tracking.SFT_RUN_TAG: sft_run, "beta": str(best.beta), "lr": str(best.lr)})
            client.set_tag(parent, "raydpo.registered_model", f"{name}/{version}")
    tracking.end_run(uri, parent, "FINISHED")
