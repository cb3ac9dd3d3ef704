"""Imports only go down (DESIGN.md's dependency rule): every module of the package sits in a layer, and no import,
at module level, inside a function or under TYPE_CHECKING, reaches a higher layer or closes a loop.

`python -m tests.unit.test_layers [PACKAGE_DIR]` prints the counts (upward imports, modules in cycles) for any
checkout, e.g. an older one, without pytest.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.helpers import ROOT

# lowest first; a module is placed by its first name under the package (`data` holds data/*, `families` families/*)
# fmt: off
LAYERS = [
    {"errors", "system", "trackers"},
    {"loop", "checkpoint", "output_folder", "distributed", "optim", "ema", "hub", "curriculum", "batching", "models",
     "lock"},
    {"alignment", "codecs", "data", "metrics", "samples", "difficulty", "adversarial", "codec", "report",
     "objectives"},
    {"families"},
    {"config"},
    {"stages", "cli", "__init__"},
]
# fmt: on


def layer_of(module: str) -> int:
    """The layer of a dotted module name of the package (`hf_audio_trainer.data.audio` -> data's)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{module} is in no layer: add {name!r} to LAYERS in tests/unit/test_layers.py")


def module_name(package: Path, path: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its file), read statically."""
    paths = {module_name(package, p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        base_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = base_package.split(".")[: len(base_package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def modules_in_cycles(graph: dict[str, set[str]]) -> set[str]:
    """Modules that can reach themselves through imports."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return seen

    return {m for m in graph if m in reach(m)}


PACKAGE = ROOT / "hf_audio_trainer"


def test_every_module_is_in_a_layer_and_no_import_goes_up():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40
    upward = upward_imports(graph)
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_cycle():
    assert modules_in_cycles(import_graph(PACKAGE)) == set()


def test_the_counting_sees_an_upward_import_and_a_cycle(tmp_path):
    # the checks above could not fail if the reading missed imports: a package with one of each must be caught
    package = tmp_path / "hf_audio_trainer"
    (package / "families").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "families" / "__init__.py").write_text("")
    (package / "loop.py").write_text("def f():\n    from hf_audio_trainer.config import StageConfig\n")
    (package / "config.py").write_text("from hf_audio_trainer import loop\n")
    (package / "families" / "flow.py").write_text("from .. import config\n")
    graph = import_graph(package)
    assert upward_imports(graph) == [
        ("hf_audio_trainer.families.flow", "hf_audio_trainer.config"),
        ("hf_audio_trainer.loop", "hf_audio_trainer.config"),
    ]
    assert modules_in_cycles(graph) == {"hf_audio_trainer.config", "hf_audio_trainer.loop"}


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    graph = import_graph(folder)
    upward = upward_imports(graph)
    print(f"{len(graph)} modules; {len(upward)} imports from a lower layer to a higher one; "
          f"{len(modules_in_cycles(graph))} modules in import cycles")  # fmt: skip
    for a, b in upward:
        print(f"  {a} -> {b}")
