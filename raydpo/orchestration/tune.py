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

from raydpo import storage
from raydpo.config import Config, SearchSpace
from raydpo.tracking.terminal import echo
from raydpo.metric_names import EVAL_ACCURACY, EVAL_MARGINS
from raydpo.tracking.trials import BEST_RUN_TAG, BEST_TAG, TRIAL_TAG, TrialRow



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
    """``tune.max_concurrent_trials``, else as many trials as the cluster holds now (after
    `run_tune`'s wait) while Ray Data keeps its CPUs. On a cold autoscaling cluster that is what
    the wait asked for, one trial: set ``tune.max_concurrent_trials`` for more, and the waiting
    trials' worker placement groups are the autoscaler's demand for their nodes."""
    from raydpo.orchestration.resources import trial_slots

    return cfg.tune.max_concurrent_trials or trial_slots(cfg)


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
    """The search: checks, the trials' config, the base and the data once for every trial, the
    parent MLflow run, the tuner, then the best trial tagged (and registered) in the parent run."""
    from raydpo import tracking
    from raydpo.orchestration.base import stage_base
    from raydpo.orchestration.checks import preflight
    from raydpo.orchestration.nodes import check_job_storage, check_nodes_share
    from raydpo.orchestration.ray_connect import ensure_ray
    from raydpo.orchestration.resources import training_needs, wait_for_resources

    check_job_storage(cfg)
    preflight(cfg)
    ensure_ray()
    wait_for_resources(cfg, training_needs(cfg), "tune", progress)  # one trial's; each trial waits again (at once)
    cfg = trial_config(cfg)
    check_nodes_share(cfg, cfg.tracking.tracking_uri)
    base = stage_base(cfg, "dpo")
    shared, ref_s = search_data(cfg, base, progress)
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    name = f"{cfg.run.name}-tune"
    parent = open_parent_run(cfg, uri, name, resume)
    progress(f"[tune] MLflow parent run {parent}; {_reference_note(cfg, ref_s)}")
    grid = build_tuner(cfg, name, base, parent, shared, resume, progress).fit()
    rows = _rows(grid, cfg.dpo.max_steps, uri, cfg.tracking.experiment_name, parent)
    best = pick_best(rows, cfg.tune.metric)
    _finish(uri, parent, cfg, rows, best, cfg.tune.metric)
    return rows, best


def trial_config(cfg: Config) -> Config:
    """The config every trial starts from: it reports to Tune (and checkpoints) on evaluation
    steps, shares the reference when ``tune.shared_reference``, and has absolute paths and the
    driver's MLflow store (trials run in their own trial folder)."""
    from raydpo import tracking

    # trials report to Tune only at evaluations; checkpoints land on evaluation steps too
    ev = cfg.dpo.eval_every
    overrides: dict[str, Any] = {"dpo.log_every": ev, "dpo.save_every": max(ev, cfg.dpo.save_every // ev * ev)}
    if cfg.tune.shared_reference:
        overrides["dpo.reference"] = "precomputed"
    # trials run in their own trial folder: give them absolute paths and the driver's MLflow store
    overrides["tracking.tracking_uri"] = tracking.resolve_tracking_uri(cfg.tracking)
    return cfg.with_absolute_paths().with_overrides(overrides)


def search_data(cfg: Config, base: tuple[str, str], progress) -> tuple[tuple[Any, Any] | None, float]:
    """(the (train, eval) datasets materialized once for every trial, or None without
    ``tune.share_data``; the seconds the reference pass took). An empty eval split is an error:
    trials are ranked on it."""
    from raydpo.orchestration.checks import check_batch_fits
    from raydpo.orchestration.launch import stage_datasets

    t0 = time.perf_counter()
    datasets = stage_datasets(cfg, "dpo", *base, progress)
    ref_s = time.perf_counter() - t0
    if datasets[1] is None:
        raise ValueError(f"the eval split is empty: Tune ranks trials on {cfg.tune.metric}; raise data.eval_fraction")
    if not cfg.tune.share_data:
        return None, ref_s
    # every trial would otherwise start its own Ray Data read (+ tokenization when the reference
    # is not shared) of the same pairs, in its own start-up
    shared = tuple(ds.materialize() for ds in datasets)
    n_train = shared[0].count()
    check_batch_fits("tune", n_train, "pairs", cfg.scaling.num_workers, cfg.dpo.per_device_batch_size)
    progress(f"[tune] {n_train} train / {shared[1].count()} eval pairs materialized once for every "
             f"trial in {time.perf_counter() - t0 - ref_s:.0f}s")
    return shared, ref_s


def open_parent_run(cfg: Config, uri: str, name: str, resume: bool) -> str:
    """The search's parent MLflow run: ``--resume``'s newest one called ``name``, or a new one
    tagged with the SFT run the adapter came from, the config as params."""
    from raydpo import tracking

    exp_id = tracking.setup_experiment(uri, cfg.tracking.experiment_name)
    parent = _find_parent(uri, cfg.tracking.experiment_name, name) if resume else None
    if parent is None:
        sft_run = tracking.run_for_adapter(uri, cfg.tracking.experiment_name, cfg.dpo.sft_adapter) if cfg.dpo.sft_adapter else None
        parent = tracking.start_run(uri, exp_id, name, tags={tracking.STAGE_TAG: "tune", tracking.SFT_RUN_TAG: sft_run or "",
                                                             "raydpo.sft_adapter": cfg.dpo.sft_adapter or ""})
        tracking.log_params(uri, parent, cfg.flat())
    return parent


def _reference_note(cfg: Config, ref_s: float) -> str:
    """How the trials get their reference log-probs, for the parent run's line."""
    return (f"reference log-probs ready in {ref_s:.0f}s" if cfg.dpo.precomputed_reference
            else f"no reference pass ({'/'.join(cfg.dpo.loss_types)} reads no reference)" if not cfg.dpo.needs_reference
            else "a reference forward in every trial step (dpo.reference=adapter_disabled)")


def _trainable(cfg: Config, base: tuple[str, str], parent: str, shared: tuple[Any, Any] | None):
    """`_trial` with everything but the sampled point bound; it needs no CPU of its own."""
    from functools import partial

    from ray import tune

    fn = partial(_trial, base_cfg=cfg.to_dict(), base=base, parent_run_id=parent)
    if shared is not None:
        fn = tune.with_parameters(fn, datasets=shared)  # the object store holds the blocks once
    # the trial only drives its TorchTrainer; CPUs stay with Ray Data
    return tune.with_resources(fn, {"CPU": 0, "memory": 1})


def build_tuner(cfg: Config, name: str, base: tuple[str, str], parent: str, shared: tuple[Any, Any] | None,
                resume: bool, progress):
    """The search's `Tuner` in `storage.tune_dir`, its trials children of MLflow run ``parent``:
    restored with ``--resume`` where it can be, else new (ASHA unless ``tune.scheduler=fifo``,
    Optuna when ``tune.searcher=optuna``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
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
    trainable = _trainable(cfg, base, parent, shared)
    folder = storage.tune_dir(cfg.run.storage_path, name)
    if resume and tune.Tuner.can_restore(folder):
        progress(f"[tune] resuming {folder}")
        return tune.Tuner.restore(folder, trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"beta": _space(t.beta), "lr": _space(t.lr)},
        tune_config=tune.TuneConfig(num_samples=t.num_samples, scheduler=scheduler, search_alg=search_alg,
                                    max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune.RunConfig(name=storage.name(folder), storage_path=storage.parent(folder), verbose=0),
    )


def pick_best(rows: list[TrialRow], metric: str) -> TrialRow | None:
    """The best finished trial (it has an adapter to register); a stopped one only if none finished."""
    scored = [r for r in rows if not math.isnan(r.score(metric))]
    return max([r for r in scored if r.status == "DONE"] or scored, key=lambda r: r.score(metric), default=None)


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
        client.set_tag(parent, BEST_RUN_TAG, best.run_id)
        client.log_metric(parent, f"best/{metric}", best.score(metric))
        if best.status == "DONE":
            name = cfg.tracking.register_model_name or f"{cfg.tracking.experiment_name}-dpo"
            sft_run = client.get_run(parent).data.tags.get(tracking.SFT_RUN_TAG, "")
            version = tracking.register_model(uri, best.run_id, "adapter", name, tags={
                "raydpo.tune_parent_run_id": parent, "raydpo.trial_run_id": best.run_id,
                tracking.SFT_RUN_TAG: sft_run, "beta": str(best.beta), "lr": str(best.lr)})
            client.set_tag(parent, "raydpo.registered_model", f"{name}/{version}")
    tracking.end_run(uri, parent, "FINISHED")
