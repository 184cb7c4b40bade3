"""The package layering of fusion/__init__.py: no module imports a package listed after its own, no cycles."""

import ast
from pathlib import Path

import fusion

ROOT = Path(fusion.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The fusion modules ``name`` imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target != "fusion":
                found.add(target)
    return found


def _layer(module: str) -> int:
    return fusion.LAYERS.index(module.split(".")[1])


def test_every_module_belongs_to_a_layer():
    assert [m for m in _modules() if m != "fusion" and m.split(".")[1] not in fusion.LAYERS] == []


def test_no_module_imports_a_later_layer():
    mods = _modules()
    upward = [
        f"{name} imports {target}"
        for name, path in mods.items() if name != "fusion"
        for target in sorted(_imports(name, path, mods))
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    # Kahn's algorithm: whatever cannot be ordered lies on a cycle.
    pending = {name: set(deps) for name, deps in graph.items()}
    while True:
        free = [name for name, deps in pending.items() if not deps]
        if not free:
            break
        for name in free:
            del pending[name]
        for deps in pending.values():
            deps.difference_update(free)
    assert sorted(pending) == []
