"""Test helper (not collected): which metrics a Grafana dashboard queries, and whether Ray defines
them. Shared by ``tests/test_dashboard.py`` and ``tests/integration/test_metrics_export.py``."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards" / "raydpo.json"

# PromQL functions and aggregation operators (Prometheus 2.x/3.x docs). An identifier is one of
# these only when a "(" follows it; otherwise it is a metric name (PromQL allows `time` as one).
FUNCTIONS = frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
time timestamp vector year
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
start end
""".split())
# Words that are never metric names: binary/set operators, modifiers, special float literals.
KEYWORDS = frozenset("and or unless atan2 bool offset inf nan".split())
# Clauses whose parenthesised list holds label names, not expressions.
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_BARE_GROUPING = re.compile(r"\b(?:group_left|group_right)\b", re.I)
_OFFSET = re.compile(r"\boffset\s+-?(?:\d+(?:ms|[smhdwy]))+", re.I)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_TOKEN = re.compile(
    r"0[xX][0-9a-fA-F]+"                           # hex number
    r"|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"  # decimal number
    r"|\$\{[^}]*\}|\$\w+|\[\[\w+\]\]"             # Grafana variables
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|\S"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<expr>.*?)\s*(?:,\s*[A-Za-z_]\w*\s*)?\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana ``label_values(...)`` variable query).

    Strings, label matchers ``{...}``, ranges ``[...]``, label lists of ``by``/``without``/``on``/
    ``ignoring``/``group_left``/``group_right``, numbers, ``offset`` durations, Grafana
    variables, functions and keywords are not metric names; every other identifier is.
    """
    if "__name__" in expr:
        raise ValueError(f"matching on __name__ is not understood by this checker: {expr!r}")
    m = _LABEL_VALUES.match(expr)
    if m:  # label_values(label) queries no metric; label_values(metric{..}, label) queries one
        inner = m["expr"]
        expr = "" if re.fullmatch(r"[A-Za-z_]\w*", inner) and "," not in m.group(0) else inner
    expr = _STRING.sub(" ", expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = _OFFSET.sub(" ", expr)
    expr = _GROUPING.sub(" ", expr)
    expr = _BARE_GROUPING.sub(" ", expr)
    tokens = [(t.group(0), t.group("ident") is not None) for t in _TOKEN.finditer(expr)]
    names: set[str] = set()
    for i, (tok, is_ident) in enumerate(tokens):
        if not is_ident or tok.lower() in KEYWORDS:
            continue
        nxt = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if nxt == "(" and tok in FUNCTIONS:
            continue
        if nxt == "(":
            raise ValueError(f"unknown PromQL function {tok!r} in {expr!r}")
        names.add(tok)
    return names


# -- the dashboard -------------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of every panel target and every query variable."""
    exprs = [t["expr"] for p in iter_panels(dashboard["panels"]) for t in p.get("targets", [])]
    return exprs + variable_queries(dashboard)


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    return set().union(*(metric_names(e) for e in dashboard_expressions(dashboard)))


# -- what Ray defines ----------------------------------------------------------------------

RAY_PREFIX = "ray_"
# Suffixes a Prometheus exporter adds to counters and histograms.
EXPORT_SUFFIXES = ("_total", "_bucket", "_sum", "_count")
# Ray's C++ metrics (raylet, GCS, core worker: ray_object_store_memory, ray_resources, ...) are
# defined in compiled code: their names are NUL-terminated strings in these files.
RAY_BINARIES = ("core/src/ray/raylet/raylet", "core/src/ray/gcs/gcs_server", "_raylet.so")


def ray_root() -> Path:
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    assert spec is not None and spec.origin, "ray is not installed"
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def ray_python_literals() -> frozenset[str]:
    """Every identifier-like string literal in the installed Ray's Python source."""
    lit = re.compile(r"""["']([A-Za-z_][A-Za-z0-9_]*)["']""")
    found: set[str] = set()
    for p in ray_root().rglob("*.py"):
        found.update(lit.findall(p.read_text(errors="ignore")))
    return frozenset(found)


@functools.lru_cache(maxsize=1)
def ray_binary_strings() -> frozenset[str]:
    found: set[str] = set()
    for rel in RAY_BINARIES:
        data = (ray_root() / rel).read_bytes()  # missing binary: fail, never check against nothing
        found.update(m.decode() for m in re.findall(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]{2,}(?=\x00)", data))
    return frozenset(found)


def ray_defines(exported: str) -> bool:
    """Whether the installed Ray defines the metric Prometheus sees as ``exported``
    (``ray_node_cpu_utilization`` -> the literal ``"node_cpu_utilization"``; exporter suffixes such
    as ``_total`` may have been added). Exact literals only, never substrings."""
    if not exported.startswith(RAY_PREFIX):
        return False
    base = exported[len(RAY_PREFIX):]
    candidates = {base} | {base[: -len(s)] for s in EXPORT_SUFFIXES if base.endswith(s) and len(base) > len(s)}
    if candidates & ray_python_literals():
        return True
    return bool(candidates & ray_binary_strings())


def unknown_metrics(names: set[str], raydpo_exported: tuple[str, ...]) -> list[str]:
    """The names neither raydpo (``raydpo_exported``) nor Ray exports."""
    bad = []
    for n in sorted(names):
        if n.startswith(RAY_PREFIX + "raydpo_"):
            ok = n in raydpo_exported  # raydpo's own namespace: never fall back to Ray's source
        else:
            ok = ray_defines(n)
        if not ok:
            bad.append(n)
    return bad
