"""The package's layers, bottom to top: each imports only the layers below it (or itself).

Every ``import raydpo...`` counts, the lazy ones inside functions included (raydpo imports
heavy libraries late, so most of its arrows are there). Three tables:

* ``LAYERS``: the layers, bottom to top, with their modules; README's Layout table is rendered
  from it (``python tests/test_layers.py`` prints it; a test checks README holds exactly that).
* ``SUBLAYERS``: the same rule inside a package (the loop below the Ray worker, a stage's launch
  below Tune, ...).
* ``NEVER``: imports a module must never make, whatever the layers allow, with the reason.
* ``WEIGHT``: what importing a module may not load into a fresh interpreter (the light-import
  rule: ``raydpo validate`` and the driver's tools stay fast and never start Ray).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raydpo"

LAYERS = [  # (layer, its modules and packages, what it holds), bottom to top
    ("names", ["raydpo.loss_names", "raydpo.metric_names"],
     "the loss names and what each reads; the metric names (torch-free: config, losses, tracking read them)"),
    ("config", ["raydpo.config"], "one typed config per stage, YAML + `--set`, validation, resume fingerprint, presets"),
    ("storage", ["raydpo.storage", "raydpo.storage_copy"],
     "every path under `run.storage_path` (a folder or a URI): the only place that joins or opens one; node-local copies"),
    ("losses", ["raydpo.losses"], "the preference losses and their metric sums, pure tensor functions"),
    ("data", ["raydpo.data"], "formats, row checks, tokenizer loading, tokenization, collation, order, Ray Data pipeline, sample"),
    ("models", ["raydpo.models"], "model factory (4-bit/8-bit, LoRA), the DPO forward, pair attention and the fused LM head, merge/export, tiny model"),
    ("tracking", ["raydpo.tracking"], "MLflow: store checks, runs, loggers, plots, trials; Prometheus exporter; terminal lines"),
    ("train", ["raydpo.train"], "worker side: the loop, checkpoints, engines, the Ray worker, the torchrun runner"),
    ("orchestration", ["raydpo.orchestration"],
     "driver side: Ray connection, a stage's launch, base/merge, reference pass, training stream, Tune, jobs, console, errors, estimates"),
    ("report", ["raydpo.report"], "the HTML report"),
    ("cli", ["raydpo.cli"], "the `raydpo` command"),
    ("benchmarks", ["raydpo.benchmarks"], "measurements against peers"),
]
RANK = {name: i for i, (name, _, _) in enumerate(LAYERS)}
OWNER = {module: name for name, modules, _ in LAYERS for module in modules}

SUBLAYERS = {  # package -> its modules' sub-layers, bottom to top (a module not listed sits in none)
    "raydpo.train": [
        ["raydpo.train", "raydpo.train.inputs", "raydpo.train.progress", "raydpo.train.faults", "raydpo.train.preempt",
         "raydpo.train.hang", "raydpo.train.deepspeed", "raydpo.train.generate"],
        ["raydpo.train.plain", "raydpo.train.engine", "raydpo.train.checkpoint", "raydpo.train.ref_scoring"],
        ["raydpo.train.loop"],
        ["raydpo.train.worker", "raydpo.train.standalone"],
    ],
    "raydpo.orchestration": [
        ["raydpo.orchestration", "raydpo.orchestration.errors", "raydpo.orchestration.console",
         "raydpo.orchestration.ingest", "raydpo.orchestration.preemption", "raydpo.orchestration.ray_callbacks",
         "raydpo.orchestration.estimate", "raydpo.orchestration.passes", "raydpo.orchestration.submit"],
        ["raydpo.orchestration.checks", "raydpo.orchestration.ray_connect", "raydpo.orchestration.reference",
         "raydpo.orchestration.nodes", "raydpo.orchestration.resources"],
        ["raydpo.orchestration.base"],
        ["raydpo.orchestration.launch"],
        ["raydpo.orchestration.tune"],
    ],
    "raydpo.tracking": [
        ["raydpo.tracking.terminal", "raydpo.tracking.trials", "raydpo.tracking.store", "raydpo.tracking.prometheus"],
        ["raydpo.tracking.plots", "raydpo.tracking.runs"],
        ["raydpo.tracking.logger"],
        ["raydpo.tracking"],
    ],
}

NEVER = [  # (module or package, import prefix it never makes, why)
    ("raydpo.config", "torch", "`raydpo validate` is instant"),
    ("raydpo.config", "ray", "a config never starts Ray"),
    ("raydpo.loss_names", "torch", "the config validates loss names without torch"),
    ("raydpo.storage", "torch", "the driver's tools name paths without torch"),
    ("raydpo.storage", "ray", "workers, driver and tools share it"),
    ("raydpo.losses", "ray", "pure tensor maths"),
    ("raydpo.losses", "peft", "pure tensor maths"),
    ("raydpo.losses", "raydpo.config", "a loss takes numbers, not a config"),
    ("raydpo.models", "ray", "models know nothing about Ray"),
    ("raydpo.tracking", "torch", "tracking is read on the driver and by tools without torch"),
    ("raydpo.train.loop", "ray", "the loop runs under Ray Train and plain torchrun alike"),
    ("raydpo.train.checkpoint", "ray", "checkpoints are files; Ray only carries them"),
    ("raydpo.train.engine", "ray", "the engines run under torchrun too"),
    ("raydpo.train", "ray.data", "workers read their shard; Ray Data runs on the driver's plan"),
    ("raydpo.train", "ray.tune", "trials are built on the driver"),
    ("raydpo.report", "raydpo.orchestration", "the report reads MLflow, not the driver's code"),
]

WEIGHT = [  # (module, what importing it must not load)
    ("raydpo.loss_names", ("torch",)),
    ("raydpo.config", ("torch", "ray", "deepspeed", "bitsandbytes", "mlflow")),
    ("raydpo.storage", ("torch", "ray", "mlflow")),
    ("raydpo.losses", ("ray", "peft", "deepspeed", "bitsandbytes", "mlflow", "transformers", "raydpo.config")),
    ("raydpo.data", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.rows", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.sample", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.sources", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.formats", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.chat", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.pipeline", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.stats", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.data.tokenize", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.models.tiny", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.models.factory", ("ray", "mlflow", "deepspeed", "peft", "transformers", "bitsandbytes")),
    ("raydpo.models.pairs", ("ray", "mlflow", "deepspeed", "peft", "transformers", "bitsandbytes")),
    ("raydpo.models.fused_head", ("ray", "mlflow", "deepspeed", "peft", "transformers", "bitsandbytes")),
    ("raydpo.tracking", ("mlflow", "matplotlib", "torch")),
    ("raydpo.tracking.prometheus", ("ray", "torch", "psutil", "mlflow")),
    ("raydpo.train.deepspeed", ("ray", "deepspeed", "bitsandbytes", "mlflow")),
    ("raydpo.orchestration.ray_connect", ("ray", "torch", "transformers", "datasets")),
    ("raydpo.orchestration.estimate", ("torch", "ray", "deepspeed", "bitsandbytes", "mlflow", "transformers")),
    ("raydpo.report", ("mlflow", "matplotlib")),
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return OWNER.get(".".join(parts[:2]))


def _imports(path: Path) -> set[str]:
    """Every raydpo module ``path`` imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "raydpo":
                found |= {f"raydpo.{a.name}" for a in node.names}
            elif node.module.startswith("raydpo."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raydpo.")}
    return found


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, ``from m import n`` counted as ``m`` and ``m.n``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"]


def _within(module: str, scope: str) -> bool:
    return module == scope or module.startswith(scope + ".")


def _sublayer(module: str) -> tuple[str, int] | None:
    for package, levels in SUBLAYERS.items():
        for i, names in enumerate(levels):
            if module in names:
                return package, i
    return None


def test_every_module_sits_in_a_layer():
    assert [_module(p) for p in _modules() if _layer(_module(p)) is None] == []


def test_every_module_of_a_sublayered_package_sits_in_a_sublayer():
    missing = [_module(p) for p in _modules()
               if any(_within(_module(p), pkg) for pkg in SUBLAYERS) and _sublayer(_module(p)) is None]
    listed = {m for levels in SUBLAYERS.values() for names in levels for m in names}
    gone = sorted(m for m in listed if m not in {_module(p) for p in _modules()})
    assert (missing, gone) == ([], [])


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for path in _modules():
        here = _module(path)
        for target in sorted(_imports(path)):
            there = _layer(target)
            if there is None or RANK[there] > RANK[_layer(here)]:
                upward.append(f"{here} ({_layer(here)}) imports {target} ({there})")
    assert upward == []


def test_each_sublayer_imports_only_the_sublayers_below_it():
    upward = []
    for path in _modules():
        here = _module(path)
        mine = _sublayer(here)
        if mine is None:
            continue
        for target in sorted(_imports(path)):
            theirs = _sublayer(target) or _sublayer(".".join(target.split(".")[:-1]))
            if theirs is not None and theirs[0] == mine[0] and theirs[1] > mine[1]:
                upward.append(f"{here} (level {mine[1]}) imports {target} (level {theirs[1]})")
    assert upward == []


def test_never_rows_hold():
    broken = []
    for path in _modules():
        here = _module(path)
        for scope, banned, why in NEVER:
            if _within(here, scope):
                hits = sorted(m for m in _all_imports(path) if _within(m, banned))
                if hits:
                    broken.append(f"{here} imports {hits[0]}: {why}")
    assert broken == []


_WEIGH = """
import importlib, json, sys
loaded = {}
for module, heavy in json.loads(sys.argv[1]):
    # an earlier row loaded it: weigh this one afresh (never the first: it may load at start-up)
    if loaded and any(m in sys.modules for m in heavy):
        break
    importlib.import_module(module)
    loaded[module] = sorted(m for m in heavy if m in sys.modules)
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def import_weights() -> dict[str, list[str]]:
    """What importing each ``WEIGHT`` module loaded of its heavy list. The rows run in order in one
    fresh interpreter, each weighed before the next is imported, until a row finds one of its
    heavy libraries already loaded by an earlier row: it and the rest go on in a new interpreter
    (the light rows come first, so a few interpreters weigh them all)."""
    weights: dict[str, list[str]] = {}
    while len(weights) < len(WEIGHT):
        rest = [(m, list(h)) for m, h in WEIGHT if m not in weights]
        out = subprocess.run([sys.executable, "-c", _WEIGH, json.dumps(rest)], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
        weights.update(json.loads(out.strip().splitlines()[-1]))
    return weights


@pytest.mark.parametrize("module", [m for m, _ in WEIGHT])
def test_import_weight(module, import_weights):
    assert import_weights[module] == [], f"importing {module} loads {import_weights[module]}"


def test_the_checkers_see_lazy_imports_upward_arrows_and_never_rows(tmp_path):
    """The tests above would pass on a checker that sees nothing: this one shows it sees."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from raydpo.orchestration.launch import fit_stage\n    import raydpo.cli\n"
                   "    import ray.data\nfrom raydpo import tracking\n")
    assert _imports(src) == {"raydpo.orchestration.launch", "raydpo.cli", "raydpo.tracking"}
    assert RANK[_layer("raydpo.orchestration.launch")] > RANK[_layer("raydpo.data.tokenize")]
    assert any(_within(m, "ray.data") for m in _all_imports(src)) and not _within("raydpo.cli", "ray")
    assert _sublayer("raydpo.train.worker")[1] > _sublayer("raydpo.train.loop")[1]
    assert _spells("raydpo_run.json", "raydpo_run.json", False) and _spells("adapter", "adapter", True)
    assert _spells("runs/*/sft-merged/x", "sft-merged", False) and _spells("mlflow_buffer_{stage}.jsonl", "mlflow_buffer_", True)
    assert not _spells("adapter_config.json", "adapter", True) and not _spells("the reference", "reference", False)
    # the weigher sees what an import loads, and weighs a row afresh after a row that loaded its library
    rows = [["raydpo.config", ["yaml"]], ["raydpo.storage", ["yaml"]]]
    out = subprocess.run([sys.executable, "-c", _WEIGH, json.dumps(rows)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert json.loads(out) == {"raydpo.config": ["yaml"]}


def test_run_folder_names_are_spelled_only_in_storage():
    """`raydpo.storage` is the one module that names what lies under ``run.storage_path``: no
    other module outside the benchmarks joins one of its names to a path or spells it in one."""
    from raydpo import storage

    names = [v.split("{")[0].rstrip("*_") for k, v in vars(storage).items() if k.isupper() and isinstance(v, str)]
    spelled = []
    for path in _modules():
        if path == PACKAGE / "storage.py" or _within(_module(path), "raydpo.benchmarks"):
            continue
        for node, joined in _strings(ast.parse(path.read_text())):
            hits = [n for n in names if _spells(node.value, n, joined)]
            spelled += [f"{_module(path)}:{node.lineno} spells {n!r}" for n in hits]
    assert spelled == []


def _strings(tree: ast.AST):
    """(string constant, whether it is the right operand of ``/``: a path join)."""
    joins = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node, id(node) in joins


def _spells(text: str, name: str, joined: bool) -> bool:
    """``text`` names ``name`` as a path: joined to one, a path or glob built from it, or a file
    name of its own (with a dot, dash or underscore: never a word of prose or a dict key)."""
    import re

    if " " in text or "\n" in text:
        return False
    if joined and (text == name or re.match(rf"{re.escape(name)}(_[a-z]*\{{|_\*|\{{)", text)):
        return True
    if re.search(rf"(^|/){re.escape(name)}([/*]|$)", text) and ("/" in text or "*" in text):
        return True
    return text.startswith(name) and any(c in name for c in "._-") and name not in ("deepspeed",)


def layout_table() -> str:
    """README's Layout table, rendered from ``LAYERS``."""
    def where(modules: list[str]) -> str:
        return ", ".join(f"`{m.replace('.', '/')}{'/' if (ROOT / m.replace('.', '/')).is_dir() else '.py'}`"
                         for m in modules)

    rows = ["| layer | where | what |", "|---|---|---|"]
    rows += [f"| {name} | {where(modules)} | {what} |" for name, modules, what in LAYERS]
    return "\n".join(rows)


def test_readme_layout_table_is_the_layer_table():
    assert layout_table() in (ROOT / "README.md").read_text(), (
        "README's Layout table differs from tests/test_layers.py's LAYERS: paste `python tests/test_layers.py`")


if __name__ == "__main__":
    print(layout_table())
