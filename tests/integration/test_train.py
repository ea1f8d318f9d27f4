"""SFT and DPO as real Ray Train jobs: 2 CPU workers, DeepSpeed ZeRO-2/3, 4-bit LoRA, real MLflow."""

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _quick(tmp_path, *extra):
    from raydpo.config.presets import demo_config

    return demo_config(quick=True, overrides=[
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"model.cache_dir={REPO / '.raydpo_cache'}",
        *extra,
    ])


def _runs(uri, experiment):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


@pytest.mark.timeout(900)
def test_demo_cli_runs_sft_then_dpo_and_tracks_both(demo_run):
    """The README's main command, shortened: SFT then DPO, 2 workers, ZeRO-2, 4-bit LoRA."""
    demo_run.check()
    r = demo_run
    env = {"MLFLOW_TRACKING_URI": demo_run.tracking_uri}
    assert "== raydpo summary ==" in r.stdout and "mlflow ui" in r.stdout
    assert "[dpo] step 1/" in r.stdout + r.stderr  # progress is visible while it runs

    runs = _runs(env["MLFLOW_TRACKING_URI"], "raydpo-demo")
    assert len(runs) == 2
    by_stage = {row["tags.raydpo.stage"]: row for _, row in runs.iterrows()}
    sft, dpo = by_stage["sft"], by_stage["dpo"]
    assert dpo["tags.raydpo.sft_run_id"] == sft["run_id"]
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                "train/rewards/margins", "train/logps/chosen", "train/logps/rejected", "eval/loss",
                "eval/rewards/accuracies", "eval/rewards/margins", "train/tokens_per_s", "train/step_time_s",
                "train/lr"):
        assert f"metrics.{key}" in runs.columns and not math.isnan(dpo[f"metrics.{key}"]), key
    assert dpo["params.dpo.beta"] == "0.1" and dpo["params.quantization.mode"] == "4bit"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    first = min(client.get_metric_history(dpo["run_id"], "train/loss"), key=lambda m: m.step)
    assert first.step == 1 and abs(first.value - math.log(2)) < 0.01
    arts = {a.path for a in client.list_artifacts(dpo["run_id"])}
    assert {"adapter", "config.yaml", "reward_curves.png", "eval_generations.json"} <= arts
    from raydpo import tracking

    step, rows = tracking.latest_generations(tracking.load_generations(env["MLFLOW_TRACKING_URI"], dpo["run_id"]))
    assert step == int(dpo["params.dpo.max_steps"]) and 0 < len(rows) <= 4  # the same K prompts at every eval
    assert all(set(r) == set(tracking.GENERATION_COLUMNS) and r["prompt"].startswith("Question: ") for r in rows)


CHATTER = ("TrainingReport", "Setting accelerator", "shm_comm_op", "Warning", "WARNING", "RayTrainWorker pid=",
           "core_worker", "Loading weights", "Writing model shards", "Progress bars disabled")


def test_demo_console_shows_raydpo_lines_and_progress_and_logs_the_rest(demo_run):
    """`raydpo demo --quick` as a person reads it: raydpo's own lines and one progress line per
    logging step with its ETA; the workers' and libraries' chatter only in the run folder's log."""
    demo_run.check()
    shown = demo_run.stdout + demo_run.stderr
    assert [c for c in CHATTER if c in shown] == []
    assert demo_run.stderr.strip() == ""
    for stage in ("sft", "dpo"):
        steps = [ln for ln in demo_run.stdout.splitlines() if ln.startswith(f"[{stage}] step ")]
        assert [ln.split()[2] for ln in steps] == ["1/6", "3/6", "6/6"], steps  # once each, in order
        assert " eta " in steps[1] and " done in " in steps[-1]
    logs = list((demo_run.workdir / "runs").glob("demo-*/raydpo.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in demo_run.stdout
    log = logs[0].read_text()
    assert "TrainingReport" in log and "(RayTrainWorker pid=" in log  # routed, not lost
    assert "[dpo] step 6/6" in log


def _assert_checkpoint(path, step, stage):
    p = Path(path)
    assert (p / "adapter" / "adapter_config.json").exists()
    assert (p / "adapter" / "adapter_model.safetensors").exists()
    assert (p / "adapter" / "tokenizer_config.json").exists()
    assert any((p / "deepspeed" / "state").glob("*optim_states.pt"))  # optimizer shards of every rank
    state = json.loads((p / "trainer_state.json").read_text())
    assert (state["step"], state["stage"]) == (step, stage)
    from raydpo.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(p)["world_size"] == 2  # every rank's manifest present and matching


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, demo_run, ray_connected):
    """DPO under ZeRO-3 over 4-bit LoRA from the demo's SFT adapter (``dpo.sft_reference: adapter``,
    the default: the policy trains the SFT adapter on the 4-bit base, the reference is a frozen copy
    of it), in-process on the session cluster: checked by the ZeRO-3 test, then rerun and resumed by
    the resume test (the frozen copy partitioned by ZeRO-3 beside the trained adapter). (SFT under
    ZeRO-3: test_standalone.py's SFT run.)

    It runs under a new run name in the demo's run storage, as a user's second DPO run from the
    same SFT adapter does: the reference log-probs the demo's DPO stage cached there (same base,
    SFT adapter content, tokenizer and data) are reused, not scored again; its own MLflow store."""
    from raydpo.orchestration.launch import fit_stage

    demo_run.check()
    tmp = tmp_path_factory.mktemp("z3")
    sft = _runs(demo_run.tracking_uri, "raydpo-demo")
    sft = sft[sft["tags.raydpo.stage"] == "sft"].iloc[0]
    cfg = _quick(tmp, "deepspeed.stage=3", "deepspeed.stage3_param_persistence_threshold=0", "run.name=z3",
                 f"dpo.sft_adapter={sft['tags.raydpo.adapter_path']}", f"run.storage_path={demo_run.workdir / 'runs'}")
    said: list[str] = []
    result = fit_stage(cfg, "dpo", progress=said.append)
    assert any(s.startswith("[reference] reusing reference log-probs") for s in said), said
    return cfg, result


@pytest.mark.timeout(900)
def test_zero3_4bit_dpo_from_an_sft_adapter_loads_and_generates(zero3):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    cfg, dpo = zero3
    _assert_checkpoint(dpo.checkpoint_path, cfg.dpo.max_steps, "dpo")
    assert abs(dpo.history[0]["train/loss"] - math.log(2)) < 0.01
    # the eval accuracy the driver returns (what the summary prints) is the final evaluation's as
    # MLflow holds it, and the number Ray ranks the checkpoints by
    acc = "eval/rewards/accuracies"
    final_eval = [h for h in dpo.history if acc in h][-1]
    assert final_eval["step"] == cfg.dpo.max_steps
    assert dpo.metrics[acc] == pytest.approx(final_eval[acc])
    assert dpo.metrics["checkpoint_score"] == pytest.approx(final_eval[acc])
    from raydpo import tracking  # ZeRO-3: every rank generated (synced), rank 0 logged

    rows = tracking.load_generations(cfg.tracking.tracking_uri, dpo.run_id)
    assert rows and {r["step"] for r in rows} >= {cfg.dpo.max_steps}

    model = AutoPeftModelForCausalLM.from_pretrained(dpo.adapter_path)
    tok = AutoTokenizer.from_pretrained(dpo.adapter_path)
    ids = tok("Question: How do I undo a git commit?\n\nAnswer: ", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # the DPO adapter is the SFT adapter trained on: an adapter on the tiny base itself (what `raydpo
    # export --merge` merges it into), and no merged SFT model was written, by this run or the demo
    base = json.loads((Path(dpo.adapter_path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).name.startswith("tiny-llama") and (Path(base) / "config.json").exists()
    assert not list(Path(cfg.run.storage_path).glob("*/sft-merged"))


@pytest.mark.timeout(600)
def test_rerun_resumes_from_latest_checkpoint(zero3):
    """On the ZeRO-3 run above: the same DPO command again reuses the finished stage; a longer run
    resumes from its latest checkpoint (ZeRO-3 partitioned states) in the same MLflow run."""
    from raydpo.orchestration.errors import ResumeConfigError
    from raydpo.orchestration.launch import fit_stage

    first, dpo = zero3
    n = first.dpo.max_steps
    again = fit_stage(first, "dpo", progress=lambda s: None)  # the same command again: already finished
    assert again.run_id == dpo.run_id and again.checkpoint_path == dpo.checkpoint_path
    logged = [h["step"] for h in dpo.history if "train/loss" in h]
    longer = first.with_overrides({"dpo.max_steps": n + 2, "dpo.save_every": n + 2, "dpo.log_every": 1})  # allowed on a resume
    said: list[str] = []
    r2 = fit_stage(longer, "dpo", progress=said.append)
    # steps 1..n were not repeated: training picked up the step-n checkpoint, in the same MLflow run,
    # which now holds each logged step once
    assert any(f"resuming run 'z3' from step {n}" in s for s in said), said
    # the cache scored the pairs the 6-step runs read; two more steps read 32 more: only those are scored
    assert any(s.startswith("[reference] adding the rows") for s in said), said
    assert any("the run reads 128 of " in s for s in said), said
    assert r2.run_id == dpo.run_id
    assert [h["step"] for h in r2.history if "train/loss" in h] == [*logged, n + 1, n + 2]
    _assert_checkpoint(r2.checkpoint_path, n + 2, "dpo")
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(first.tracking.tracking_uri)
    assert client.get_run(dpo.run_id).info.status == "FINISHED"  # nothing left RUNNING
    assert sorted(m.step for m in client.get_metric_history(dpo.run_id, "train/loss")) == [*logged, n + 1, n + 2]
    # a changed config is refused, naming the keys; --restart starts over and keeps the old folder
    with pytest.raises(ResumeConfigError, match=r"dpo\.beta .*--restart"):
        fit_stage(longer.with_overrides({"dpo.beta": 0.2}), "dpo", progress=lambda s: None)
