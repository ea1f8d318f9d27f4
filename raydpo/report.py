"""``raydpo report``: one self-contained HTML page comparing the runs of an MLflow experiment.

The page is a single file to attach to a PR or mail: inline CSS, PNG charts embedded as base64
``data:`` URIs, no script and no external resource, so it renders the same offline, from any
folder. Contents: a runs table, reward curves compared across runs (one chart per metric, one
line per run), the eval generations of each run that logged them (its latest step's table:
prompt, policy, reference, chosen), and for each Tune search a trial table with the best trial
marked and a beta x lr scatter coloured by the search metric.

Everything is read through `raydpo.tracking` (the only module importing mlflow); matplotlib is
imported lazily and used without pyplot (a bare ``Figure`` on the Agg canvas), as in
`raydpo.tracking.plots`.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raydpo import tracking
from raydpo.metric_names import EVAL_ACCURACY, EVAL_MARGINS, TOKENS_PER_S
from raydpo.tracking.plots import PLOT_KEYS, figure, png, trials_scatter
from raydpo.tracking.trials import BEST_RUN_TAG, BEST_TAG, TRIAL_TAG, TrialRow

EXIT_USAGE = 2
# eval first (what runs are compared on), margins and accuracy leading; train curves follow for diagnosis
_LEAD = ("rewards/margins", "rewards/accuracies", "loss")
CHART_KEYS = tuple(f"{split}/{k}" for split in ("eval", "train")
                   for k in sorted(PLOT_KEYS, key=lambda k: _LEAD.index(k) if k in _LEAD else len(_LEAD)))
_FETCH_KEYS = list(CHART_KEYS) + [TOKENS_PER_S]


class ReportError(ValueError):
    """The experiment cannot be reported on (unknown store or experiment, no runs)."""


@dataclass
class RunInfo:
    run_id: str
    name: str
    stage: str
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)  # tracking.GENERATION_COLUMNS rows

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(tracking.PARENT_TAG) or None

    @property
    def beta(self) -> float | None:
        # a trial logs the sampled value as `beta`; a plain DPO run has it in the flattened config
        return _num(self.params.get("beta", self.params.get("dpo.beta")) if self.stage != "tune" else None)

    @property
    def lr(self) -> float | None:
        if self.stage == "tune":
            return None  # the parent holds search spaces, not one value
        return _num(self.params.get("lr", self.params.get(f"{self.stage}.lr")))

    @property
    def last_step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0

    def mean(self, key: str) -> float | None:
        vals = [h[key] for h in self.history if key in h]
        return sum(vals) / len(vals) if vals else None


# -- reading the store ------------------------------------------------------------------------

def load_runs(uri: str, experiment_name: str) -> list[RunInfo]:
    """Every active run of the experiment, oldest first, with the histories the charts need.

    Raises `ReportError` for a sqlite store that does not exist (opening it would create an empty
    database as a side effect), an unknown experiment, or an experiment without runs."""
    db = tracking._sqlite_path(uri)
    if db is not None and not db.exists():
        raise ReportError(f"no MLflow store at {db} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    found = tracking.find_runs(uri, experiment_name)
    if found is None:
        raise ReportError(f"no experiment named {experiment_name!r} in {uri}")
    if not found:
        raise ReportError(f"experiment {experiment_name!r} in {uri} has no runs")
    runs = []
    for r in found:
        logged = [k for k in _FETCH_KEYS if k in r.data.metrics]
        runs.append(RunInfo(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id, stage=r.data.tags.get(tracking.STAGE_TAG, ""),
            status=r.info.status, start_ms=r.info.start_time, end_ms=r.info.end_time, params=dict(r.data.params),
            tags=dict(r.data.tags), metrics=dict(r.data.metrics),
            history=tracking.fetch_history(uri, r.info.run_id, logged) if logged else [],
            generations=tracking.load_generations(uri, r.info.run_id)))
    return runs


def trial_rows(parent: RunInfo, runs: list[RunInfo]) -> tuple[list[TrialRow], TrialRow | None]:
    """The trials (child runs) of a Tune parent as `raydpo.tracking.trials.TrialRow`, and the best one: the
    child tagged ``raydpo.best_trial`` or named by the parent's ``raydpo.best_run_id``."""
    rows, best = [], None
    best_id = parent.tags.get(BEST_RUN_TAG)
    for r in runs:
        if r.parent_id != parent.run_id:
            continue
        row = TrialRow(trial_id=r.tags.get(TRIAL_TAG) or r.params.get("trial_id") or r.name,
                       beta=_nan(r.beta), lr=_nan(r.lr), accuracy=_nan(r.metrics.get(EVAL_ACCURACY)),
                       margins=_nan(r.metrics.get(EVAL_MARGINS)), steps=r.last_step, status=r.status, run_id=r.run_id)
        rows.append(row)
        if r.tags.get(BEST_TAG) == "true" or r.run_id == best_id:
            best = row
    return rows, best


# -- charts (PNG bytes, no pyplot) ------------------------------------------------------------

def compare_chart(key: str, runs: list[RunInfo]) -> bytes | None:
    """PNG of ``key`` over steps, one line per run that logged it; None when none did."""
    series = [(r.name, [(h["step"], h[key]) for h in r.history if key in h]) for r in runs]
    series = [(name, pts) for name, pts in series if pts]
    if not series:
        return None
    fig = figure((6.4, 3.6))
    ax = fig.subplots()
    for name, pts in series:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-" if len(pts) < 12 else "-", markersize=3, label=_short(name))
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=1 + len(series) // 8)
    fig.tight_layout()
    return png(fig)


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem;color:#222;max-width:1400px}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem}.meta code{font-size:.85rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;white-space:nowrap}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#fff6d5;font-weight:600}.child td:first-child{padding-left:1.5rem}
.status-FINISHED{color:#1a7f37}.status-FAILED{color:#cf222e}.status-KILLED{color:#9a6700}.status-RUNNING{color:#0969da}
.charts{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figcaption{font-size:.8rem;color:#555}
code{font-family:ui-monospace,Menlo,Consolas,monospace}.wide{overflow-x:auto}
td.text{white-space:pre-wrap;word-break:break-word;vertical-align:top;min-width:12rem;max-width:32rem}
h3{font-size:1rem;margin-bottom:.2rem}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "—" if v is None or math.isnan(v) else format(v, spec)


def _short(name: str, n: int = 40) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _when(ms: int | None) -> str:
    if not ms:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(r: RunInfo) -> str:
    if not r.start_ms:
        return "—"
    if not r.end_ms:
        return "running" if r.status == "RUNNING" else "—"
    s = max(0, round((r.end_ms - r.start_ms) / 1000))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'


def _table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _td(v: Any, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f'<td class="{_e(classes)}">{_e(v)}</td>' if classes else f"<td>{_e(v)}</td>"


def _run_anchor(run_id: str) -> str:
    return f"run-{_e(run_id)}"


def _runs_table(runs: list[RunInfo]) -> str:
    headers = ["run", "stage", "status", "start", "duration", "beta", "lr", "eval accuracy", "eval margins",
               "eval loss", "tokens/s (mean)", "run id"]
    rows = []
    for r in runs:
        tps = r.mean(TOKENS_PER_S)
        cells = [_td(r.name), _td(r.stage or "—"), _td(r.status, cls=f"status-{r.status}"), _td(_when(r.start_ms)),
                 _td(_duration(r), num=True), _td(_fmt(r.beta), num=True), _td(_fmt(r.lr, ".3g"), num=True),
                 _td(_fmt(r.metrics.get(EVAL_ACCURACY)), num=True), _td(_fmt(r.metrics.get(EVAL_MARGINS)), num=True),
                 _td(_fmt(r.metrics.get("eval/loss")), num=True), _td(_fmt(tps, ".1f"), num=True),
                 f"<td><code>{_e(r.run_id)}</code></td>"]
        cls = ' class="child"' if r.parent_id else ""
        rows.append(f'<tr id="{_run_anchor(r.run_id)}"{cls}>{"".join(cells)}</tr>')
    return _table(headers, rows)


def _tune_section(parent: RunInfo, runs: list[RunInfo]) -> str:
    rows, best = trial_rows(parent, runs)
    metric = parent.params.get("tune.metric", EVAL_ACCURACY)
    out = [f"<h2>Tune search: {_e(parent.name)}</h2>",
           f'<p class="meta">parent run <a href="#{_run_anchor(parent.run_id)}"><code>{_e(parent.run_id)}</code></a>'
           f" &middot; {len(rows)} trials &middot; metric <code>{_e(metric)}</code>"
           f" &middot; best: {_e(best.trial_id) if best else 'none marked'}</p>"]
    if not rows:
        out.append("<p>No trial runs recorded under this search.</p>")
        return "\n".join(out)
    max_steps = _num(parent.params.get("dpo.max_steps"))
    def rank(r: TrialRow) -> tuple[float, str]:  # best metric first, trials without one last
        v = r.score(metric)
        return (math.inf if math.isnan(v) else -v, r.trial_id)

    table_rows = []
    for r in sorted(rows, key=rank):
        is_best = best is not None and r is best
        steps = f"{r.steps}/{int(max_steps)}" if max_steps else str(r.steps)
        cells = [_td(r.trial_id), _td(_fmt(r.beta), num=True), _td(_fmt(r.lr, ".3g"), num=True),
                 _td(_fmt(r.accuracy), num=True), _td(_fmt(r.margins), num=True), _td(steps, num=True),
                 _td(r.status, cls=f"status-{r.status}"), _td("★ best" if is_best else ""),
                 f'<td><a href="#{_run_anchor(r.run_id)}"><code>{_e(r.run_id)}</code></a></td>' if r.run_id
                 else _td("—")]
        tr = '<tr class="best">' if is_best else "<tr>"
        table_rows.append(f'{tr}{"".join(cells)}</tr>')
    out.append(_table(["trial", "beta", "lr", "eval accuracy", "eval margins", "steps run", "status", "best",
                       "run id"], table_rows))
    png = trials_scatter(rows, metric, best)
    if png is not None:
        out.append(f'<div class="charts">{_img(png, f"{parent.name}: beta x lr coloured by {metric}")}</div>')
    return "\n".join(out)


def _sampling(r: RunInfo) -> str:
    p = r.params
    if p.get("generations.do_sample", "False") != "True":
        return "greedy"
    return ("sampled: " + ", ".join(f"{k} {p[f'generations.{k}']}" for k in ("temperature", "top_p", "top_k")
                                    if f"generations.{k}" in p))


def _generations_section(runs: list[RunInfo]) -> str:
    """Per run that logged eval generations: its latest step's table (every text escaped)."""
    out = []
    for r in runs:
        step, rows = tracking.latest_generations(r.generations)
        if not rows:
            continue
        tokens = r.params.get("generations.max_new_tokens")
        out.append(f'<h3 id="gen-{_run_anchor(r.run_id)}">{_e(r.name)}</h3>'
                   f'<p class="meta">step {_e(step)} &middot; {len(rows)} prompt{"s" if len(rows) != 1 else ""} &middot; '
                   f"{_e(_sampling(r))}"
                   + (f" &middot; at most {_e(tokens)} new tokens" if tokens else "")
                   + f' &middot; run <a href="#{_run_anchor(r.run_id)}"><code>{_e(r.run_id)}</code></a></p>')
        cells = [f"<tr>{_td(int(g.get('prompt_index') or 0) + 1, num=True)}"
                 + "".join(_td(g.get(c) or "", cls="text") for c in ("prompt", "policy", "reference", "chosen"))
                 + "</tr>" for g in rows]
        out.append(_table(["#", "prompt", "policy", "reference (adapter off)", "chosen (data)"], cells))
    if not out:
        return ""
    return "<h2>Eval generations</h2>\n" + "\n".join(out)


def render_html(uri: str, experiment_name: str, runs: list[RunInfo], generated: datetime | None = None) -> str:
    generated = generated or datetime.now(timezone.utc)
    charts = [(k, png) for k in CHART_KEYS if (png := compare_chart(k, runs)) is not None]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>raydpo report: {_e(experiment_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>raydpo report: {_e(experiment_name)}</h1>",
        f'<p class="meta">tracking URI <code>{_e(uri)}</code> &middot; {len(runs)} runs &middot; generated '
        f"{_e(generated.strftime('%Y-%m-%d %H:%M:%S UTC'))}</p>",
        "<h2>Runs</h2>",
        _runs_table(runs),
        "<h2>Reward curves</h2>",
        f'<div class="charts">{"".join(_img(png, k) for k, png in charts)}</div>' if charts
        else "<p>No step metrics were logged by any run.</p>",
        _generations_section(runs),
    ]
    parts += [_tune_section(r, runs) for r in runs if r.stage == "tune"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(tracking_uri: str, experiment_name: str, out_path: str | Path) -> Path:
    """Write the HTML report of ``experiment_name`` to ``out_path`` and return its path.
    Raises `ReportError` when there is nothing to report (see `load_runs`)."""
    runs = load_runs(tracking_uri, experiment_name)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(tracking_uri, experiment_name, runs), encoding="utf-8")
    return out


# -- CLI ------------------------------------------------------------------------------------------

def default_out(experiment_name: str) -> str:
    safe = re.sub(r"[^\w.\-]+", "_", experiment_name).strip("._") or "experiment"  # a file name, not a path
    return f"raydpo-report-{safe}.html"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to a ``raydpo`` subparsers object; dispatches through ``fn``."""
    p = subparsers.add_parser("report", help="write a self-contained HTML report comparing an experiment's runs")
    p.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--out", default=None, help="output file (default: raydpo-report-<experiment>.html)")
    p.set_defaults(fn=cmd_report)
    return p


def cmd_report(args) -> int:
    # args has a `tracking_uri` attribute, which is all resolve_tracking_uri reads
    uri = tracking.resolve_tracking_uri(args)
    try:
        out = build_report(uri, args.experiment, args.out or default_out(args.experiment))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydpo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
