"""The package's import graph: layers point down, no circle, and inference needs nothing from adapt."""

from __future__ import annotations

import ast
from pathlib import Path

import fseft

ROOT = Path(fseft.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from ... import`` statement."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, *, everywhere: bool) -> set[str]:
    """fseft modules imported by ``path``: at run time at module level, or (``everywhere``) anywhere."""
    module, is_package = module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if everywhere else _module_level(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            for alias in node.names:  # ``from . import zoo`` imports the module fseft.models.zoo
                sub = f"{target}.{alias.name}"
                found.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else target)
    return {m for m in found if m == "fseft" or m.startswith("fseft.")}


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # type-only imports
        if isinstance(node, (ast.If, ast.Try)):
            out += _module_level(node.body) + _module_level(getattr(node, "orelse", []))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_inference_imports_nothing_from_adapt():
    for path in (ROOT / "inference").glob("*.py"):
        bad = sorted(m for m in imports(path, everywhere=True) if m.startswith("fseft.adapt"))
        assert not bad, f"{path.name} imports {bad}"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of ``graph`` (module -> imported modules), ignoring packages importing their own
    submodules; None when there is none."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(f"{node}."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def test_the_import_graph_has_no_circle():
    """Module-level and in-function imports alike (type-only ones aside), outside the CLI layer, whose
    commands import inside functions for a fast --help."""
    graph = {module_name(p): imports(p, everywhere=True) - _type_only(p) for p in sources()}
    graph = {k: v for k, v in graph.items() if not k.startswith("fseft.commands")}
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


def _type_only(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module, is_package = module_name(path), path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {resolve(module, is_package, n) for n in node.body if isinstance(n, ast.ImportFrom)}
    return out


def test_models_hub_sits_above_checkpoint_and_zoo():
    for name in ("checkpoint.py", "zoo.py"):
        assert "fseft.models.hub" not in imports(ROOT / "models" / name, everywhere=True), name
