"""raydpo.report against a real MLflow sqlite store (built once per module under tmp; no Ray)."""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydpo import report, tracking
from raydpo.metric_names import TOKENS_PER_S
from raydpo.tracking.trials import BEST_TAG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
EXP = "raydpo-test"
# (trial id, beta, lr, final eval accuracy, final margins, steps run, MLflow status)
TRIALS = [("t1", 0.05, 1e-5, 0.55, 0.12, 2, "KILLED"),
          ("t2", 0.2, 3e-4, 0.9, 1.7, 4, "FINISHED"),
          ("t3", 0.35, 2e-6, 0.7, 0.4, 4, "FINISHED")]
BEST = "t2"
SMALL = "small"


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def _dpo_step(step: int, split: str, scale: float = 1.0) -> dict[str, float]:
    vals = {"loss": 0.69 - 0.05 * step, "rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.1 * step * scale), "rewards/margins": 0.2 * step * scale,
            "logps/chosen": -50.0 + step, "logps/rejected": -55.0 - step}
    return {f"{split}/{k}": v for k, v in vals.items()}  # as the loops prefix them


GEN_STEPS = (4, 6)


def _generations(step: int) -> list[dict]:
    """Two prompts per evaluation; texts that must come out escaped."""
    return [{"step": step, "prompt_index": i, "prompt": f"Question: <q{i}> & why?\n\nAnswer: ",
             "policy": f"step{step} policy <script>alert({i})</script>", "reference": f"step{step} reference {i}",
             "chosen": f"chosen {i} \"quoted\""} for i in range(2)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An experiment as raydpo writes it: SFT, DPO linked to it, a Tune parent with 3 trials (one
    stopped early, one tagged best), written through raydpo.tracking's own helpers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        return _build_store(tmp_path_factory.mktemp("store"))


def _build_store(d: Path) -> SimpleNamespace:
    uri = f"sqlite:///{d / 'mlflow.db'}"
    exp = tracking.setup_experiment(uri, EXP)
    tracking.setup_experiment(uri, "empty")
    # the CLI tests only check wiring: a one-chart experiment keeps them quick
    small = tracking.start_run(uri, tracking.setup_experiment(uri, SMALL), "small-dpo", tags={tracking.STAGE_TAG: "dpo"})
    tracking.RunLogger(uri, small).log_metrics({"eval/rewards/margins": 0.5}, 2)
    tracking.end_run(uri, small)
    ids = {}

    sft = tracking.start_run(uri, exp, "demo-sft", tags={tracking.STAGE_TAG: "sft"})
    tracking.log_params(uri, sft, {"sft.lr": 1e-4, "sft.max_steps": 6})
    log = tracking.RunLogger(uri, sft)
    for step in (3, 6):
        log.log_metrics({"train/loss": 2.0 / step, TOKENS_PER_S: 1000.0 + step}, step)
        log.log_metrics({"eval/loss": 2.5 / step}, step)
    tracking.end_run(uri, sft)
    ids["demo-sft"] = sft

    dpo = tracking.start_run(uri, exp, "demo-dpo", sft_run_id=sft, tags={tracking.STAGE_TAG: "dpo"})
    tracking.log_params(uri, dpo, {"dpo.beta": 0.1, "dpo.lr": 5e-4, "dpo.max_steps": 6, "generations.do_sample": False,
                                   "generations.max_new_tokens": 64})
    log = tracking.RunLogger(uri, dpo)
    for step in (2, 4, 6):
        log.log_metrics({**_dpo_step(step, "train"), TOKENS_PER_S: 500.0}, step)
        log.log_metrics(_dpo_step(step, "eval"), step)
        if step in GEN_STEPS:
            log.log_generations(_generations(step), step)
    tracking.end_run(uri, dpo)
    ids["demo-dpo"] = dpo

    parent = tracking.start_run(uri, exp, "demo-tune", tags={tracking.STAGE_TAG: "tune"})
    tracking.log_params(uri, parent, {"tune.metric": "eval/rewards/accuracies", "dpo.max_steps": 4,
                                      "dpo.beta": 0.1, "dpo.lr": 5e-4})
    ids["demo-tune"] = parent
    for tid, beta, lr, acc, margin, steps, status in TRIALS:
        name = f"trial-{tid}-dpo"
        rid = tracking.start_run(uri, exp, name, parent_run_id=parent,
                                 tags={tracking.STAGE_TAG: "dpo", report.TRIAL_TAG: tid})
        # a trial's flattened config keeps the base dpo.beta; its sampled values are `beta`/`lr`
        tracking.log_params(uri, rid, {"dpo.beta": 0.1, "dpo.lr": 5e-4, "beta": beta, "lr": lr, "trial_id": tid})
        log = tracking.RunLogger(uri, rid)
        for step in range(2, steps + 1, 2):
            last = step == steps
            log.log_metrics({"eval/rewards/accuracies": acc if last else 0.5,
                             "eval/rewards/margins": margin if last else 0.0, "train/loss": 0.7 - 0.01 * step}, step)
        if tid == BEST:
            tracking.set_tags(uri, rid, {BEST_TAG: "true"})
        tracking.end_run(uri, rid, status)
        ids[name] = rid
    tracking.set_tags(uri, parent, {"raydpo.best_run_id": ids[f"trial-{BEST}-dpo"]})
    tracking.end_run(uri, parent)

    # a name that must come out escaped
    odd = tracking.start_run(uri, exp, "sft <script>x</script> & co", tags={tracking.STAGE_TAG: "sft"})
    tracking.end_run(uri, odd, "FAILED")
    return SimpleNamespace(uri=uri, dir=d, ids=ids)


@pytest.fixture(scope="module")
def page(store, tmp_path_factory) -> str:
    out = report.build_report(store.uri, EXP, tmp_path_factory.mktemp("out") / "sub" / "report.html")
    assert isinstance(out, Path) and out.is_file()
    return out.read_text(encoding="utf-8")


def _images(page: str) -> dict[str, bytes]:
    """alt text -> decoded PNG bytes of every embedded image."""
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    return {alt: base64.b64decode(data, validate=True) for data, alt in found}


def _row(page: str, run_id: str) -> str:
    m = re.search(rf'<tr id="run-{run_id}"[^>]*>(.*?)</tr>', page, re.S)
    assert m, f"no runs-table row for {run_id}"
    return m.group(1)


def _cells(row: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydpo")
    report.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


# -- the page -----------------------------------------------------------------------------------

def test_page_embeds_png_charts_for_each_reward_key(page):
    assert '<img src="data:image/png;base64,' in page
    imgs = _images(page)
    assert imgs and all(png.startswith(PNG_MAGIC) for png in imgs.values())
    for key in ("eval/rewards/margins", "eval/rewards/accuracies", "eval/loss", "train/loss",
                "train/rewards/chosen"):
        assert key in imgs, sorted(imgs)
    assert "demo-tune: beta x lr coloured by eval/rewards/accuracies" in imgs
    assert "train/tokens_per_s" not in imgs  # a table column, not a curve


def test_page_is_self_contained(page):
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "<style>" in page  # the CSS is inline


def test_page_header_and_every_run(page, store):
    assert f"<h1>raydpo report: {EXP}</h1>" in page
    assert store.uri in page and "generated 2" in page
    for name, rid in store.ids.items():
        assert _cells(_row(page, rid))[0] == name
    assert "sft &lt;script&gt;x&lt;/script&gt; &amp; co" in page


def test_runs_table_values(page, store):
    dpo = _cells(_row(page, store.ids["demo-dpo"]))
    # run, stage, status, start, duration, beta, lr, acc, margins, loss, tok/s, id
    assert dpo[1:3] == ["dpo", "FINISHED"]
    assert dpo[5:7] == ["0.1", "0.0005"]
    assert dpo[7:11] == ["1", "1.2", "0.39", "500.0"]  # final eval values (step 6), mean tokens/s
    assert dpo[11] == store.ids["demo-dpo"]
    sft = _cells(_row(page, store.ids["demo-sft"]))
    assert sft[1] == "sft" and sft[5] == "—" and sft[6] == "0.0001" and sft[10] == "1004.5"
    trial = _cells(_row(page, store.ids["trial-t1-dpo"]))
    assert trial[2] == "KILLED" and trial[5:7] == ["0.05", "1e-05"]  # the sampled beta, not the base dpo.beta
    assert _cells(_row(page, store.ids["demo-tune"]))[5:7] == ["—", "—"]


def test_trial_table_lists_each_trial_and_marks_the_best(page, store):
    section = page.split("<h2>Tune search: demo-tune</h2>", 1)[1]
    table = section.split("</table>", 1)[0]
    rows = re.findall(r"<tr( class=\"best\")?>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)
    cells = [(bool(best), _cells(r)) for best, r in rows]
    assert [c[0] for _, c in cells] == ["t2", "t3", "t1"]  # best metric first
    by_id = {c[0]: (best, c) for best, c in cells}
    for tid, beta, lr, acc, margin, steps, status in TRIALS:
        best, c = by_id[tid]
        assert c[1:8] == [format(beta, ".4g"), format(lr, ".3g"), format(acc, ".4g"), format(margin, ".4g"),
                          f"{steps}/4", status, "★ best" if tid == BEST else ""]
        assert best == (tid == BEST)
        assert c[8] == store.ids[f"trial-{tid}-dpo"]
    assert "best: t2" in section.split("</p>", 1)[0]


# -- pieces -------------------------------------------------------------------------------------

def test_generations_section_shows_each_runs_latest_step_escaped(page, store):
    assert "<h2>Eval generations</h2>" in page
    section = page.split("<h2>Eval generations</h2>", 1)[1].split("<h2>", 1)[0]
    assert section.count("<h3 ") == 1  # only the DPO run logged generations
    assert "demo-dpo" in section and "step 6" in section and "2 prompts" in section and "greedy" in section
    rows = re.findall(r"<tr>(<td.*?)</tr>", section, re.S)
    assert len(rows) == 2
    assert _cells(rows[0]) == ["1", "Question: &lt;q0&gt; &amp; why?\n\nAnswer: ",
                               "step6 policy &lt;script&gt;alert(0)&lt;/script&gt;", "step6 reference 0",
                               "chosen 0 &quot;quoted&quot;"]
    assert "step4" not in section  # an earlier evaluation's table is not shown
    assert "<script>" not in page


def test_trial_rows_best_from_tag_or_parent(store):
    runs = report.load_runs(store.uri, EXP)
    parent = next(r for r in runs if r.stage == "tune")
    rows, best = report.trial_rows(parent, runs)
    assert sorted(r.trial_id for r in rows) == ["t1", "t2", "t3"]
    assert best is not None and best.trial_id == BEST and best.run_id == store.ids["trial-t2-dpo"]
    # without the child's tag, the parent's raydpo.best_run_id still names it
    for r in runs:
        r.tags.pop(BEST_TAG, None)
    assert report.trial_rows(parent, runs)[1].trial_id == BEST
    parent.tags.pop("raydpo.best_run_id")
    assert report.trial_rows(parent, runs)[1] is None


def test_compare_chart_none_when_no_run_logged_the_key(store):
    runs = report.load_runs(store.uri, EXP)
    assert report.compare_chart("eval/logps/chosen", runs) is None
    assert report.compare_chart("eval/rewards/margins", runs).startswith(PNG_MAGIC)


def test_runs_without_step_metrics_say_so(store, tmp_path):
    exp = tracking.setup_experiment(store.uri, "no-metrics")
    tracking.end_run(store.uri, tracking.start_run(store.uri, exp, "bare", tags={tracking.STAGE_TAG: "sft"}), "FAILED")
    text = report.build_report(store.uri, "no-metrics", tmp_path / "r.html").read_text()
    assert "No step metrics were logged by any run." in text and "<img" not in text and "bare" in text


def test_default_out_is_a_file_name():
    assert report.default_out("raydpo-demo") == "raydpo-report-raydpo-demo.html"
    assert report.default_out("team/exp 1") == "raydpo-report-team_exp_1.html"


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_writes_report(store, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert _cli(["report", "--experiment", SMALL, "--tracking-uri", store.uri, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "small-dpo" in text and list(_images(text)) == ["eval/rewards/margins"]


def test_cli_defaults_env_uri_and_out_name(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert _cli(["report", "--experiment", SMALL]) == 0
    assert "small-dpo" in (tmp_path / f"raydpo-report-{SMALL}.html").read_text()


def test_cli_default_store_is_cwd_mlflow_db(store, tmp_path):
    # no env, no flag: ./mlflow.db, as every other raydpo command
    (tmp_path / "mlflow.db").write_bytes((store.dir / "mlflow.db").read_bytes())
    assert _cli(["report", "--experiment", SMALL, "--out", "x.html"]) == 0
    assert "small-dpo" in (tmp_path / "x.html").read_text()


@pytest.mark.parametrize("experiment, message", [("nope", "no experiment named 'nope' in sqlite:///"),
                                                 ("empty", "experiment 'empty' in sqlite:///")])
def test_cli_unknown_or_empty_experiment_exits_2(store, tmp_path, capsys, experiment, message):
    out = tmp_path / "r.html"
    assert _cli(["report", "--experiment", experiment, "--tracking-uri", store.uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert experiment != "empty" or "has no runs" in err
    assert not out.exists()


def test_cli_missing_store_exits_2_without_creating_it(tmp_path, capsys):
    db = tmp_path / "absent" / "mlflow.db"
    assert _cli(["report", "--experiment", EXP, "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert f"no MLflow store at {db}" in capsys.readouterr().err
    assert not db.exists() and not db.parent.exists()


def test_module_entry_point_and_light_import(store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "raydpo.report", "--experiment", "nope", "--tracking-uri", store.uri],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no experiment named 'nope'" in r.stderr, r.stderr
    code = ("import sys, raydpo.report as rep; light = sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules); "
            f"rc = rep.main(['--experiment', {SMALL!r}, '--tracking-uri', {store.uri!r}, '--out', 'm.html']); "
            "print(light, rc, 'matplotlib.pyplot' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "[] 0 False", r.stdout + r.stderr
    assert _images((tmp_path / "m.html").read_text())["eval/rewards/margins"].startswith(PNG_MAGIC)


def test_tune_reads_the_same_runs_through_the_same_client(store):
    # `raydpo tune --resume` finds its parent and matches Tune's trials to their MLflow runs
    # through tracking.find_runs, the reader `raydpo report` uses
    from raydpo.orchestration import tune

    assert tune._find_parent(store.uri, EXP, "demo-tune") == store.ids["demo-tune"]
    assert tune._find_parent(store.uri, EXP, "demo-dpo") is None  # a run of that name that is no search
    grid = [SimpleNamespace(metrics={"trial_id": tid, "step": steps, "eval/rewards/accuracies": acc,
                                     "eval/rewards/margins": margin}, config={"beta": beta, "lr": lr}, error=None)
            for tid, beta, lr, acc, margin, steps, _ in TRIALS]
    rows = tune._rows(grid, 4, store.uri, EXP, store.ids["demo-tune"])
    assert [(r.trial_id, r.run_id, r.status) for r in rows] == [
        ("t1", store.ids["trial-t1-dpo"], "STOPPED"),  # KILLED in MLflow: ASHA stopped it
        ("t2", store.ids["trial-t2-dpo"], "DONE"), ("t3", store.ids["trial-t3-dpo"], "DONE")]
    # the search metric picks the column it ranks on
    assert [r.score("eval/rewards/accuracies") for r in rows] == [0.55, 0.9, 0.7]
    assert [r.score("eval/rewards/margins") for r in rows] == [0.12, 1.7, 0.4]
