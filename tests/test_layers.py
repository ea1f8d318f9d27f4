"""The package's layers, bottom to top: each imports only the layers below it (or itself).

Every ``import raydpo...`` counts, the lazy ones inside functions included (raydpo imports
heavy libraries late, so most of its arrows are there).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raydpo"

LAYERS = [  # (layer, its modules and packages, what it holds), bottom to top
    ("names", ["raydpo.loss_names", "raydpo.metric_names"],
     "the loss names and what each reads, the metric names (torch-free: config, losses, tracking read them)"),
    ("config", ["raydpo.config"], "typed config per stage, validation, presets"),
    ("storage", ["raydpo.storage"], "every path under run.storage_path"),
    ("losses", ["raydpo.losses"], "pure preference losses and their metric sums"),
    ("data", ["raydpo.data"], "formats, row checks, tokenizer loading, tokenization, Ray Data pipeline, sample"),
    ("models", ["raydpo.models"], "model factory, LoRA/4-bit, tiny model, adapter merge and export"),
    ("tracking", ["raydpo.tracking"], "MLflow client, metric points, Prometheus exporter, raydpo's own terminal lines"),
    ("train", ["raydpo.train"], "the loop, Ray worker, torchrun runner, reference pass, DeepSpeed config, estimates"),
    ("orchestration", ["raydpo.orchestration"], "Ray connection, stage launch, Tune, job submission, console"),
    ("report", ["raydpo.report"], "HTML report"),
    ("cli", ["raydpo.cli"], "the raydpo command"),
    ("benchmarks", ["raydpo.benchmarks"], "measurements against peers"),
]
RANK = {name: i for i, (name, _, _) in enumerate(LAYERS)}
OWNER = {module: name for name, modules, _ in LAYERS for module in modules}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return OWNER.get(".".join(parts[:2]))


def _imports(path: Path) -> set[str]:
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


def _modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"]


def test_every_module_sits_in_a_layer():
    assert [_module(p) for p in _modules() if _layer(_module(p)) is None] == []


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for path in _modules():
        here = _module(path)
        for target in sorted(_imports(path)):
            there = _layer(target)
            if there is None or RANK[there] > RANK[_layer(here)]:
                upward.append(f"{here} ({_layer(here)}) imports {target} ({there})")
    assert upward == []


def test_the_checker_sees_lazy_imports_and_upward_arrows(tmp_path):
    """The two tests above would pass on a checker that sees nothing: this one shows it sees."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from raydpo.orchestration.launch import fit_stage\n    import raydpo.cli\n"
                   "from raydpo import tracking\n")
    assert _imports(src) == {"raydpo.orchestration.launch", "raydpo.cli", "raydpo.tracking"}
    assert RANK[_layer("raydpo.orchestration.launch")] > RANK[_layer("raydpo.data.tokenize")]
