"""The five rooms import in one direction: runtime <- models <- export <- calibration <- benchmarks.

A room may import only the rooms below it, and from another room only public names (no ``_x``
module or name). Every ``import``/``from ... import`` of every .py file counts, lazy ones inside
functions included, and relative imports are resolved to the room they reach. Module names passed as
strings (runtime.entry.launch, the benchmark workers) are not imports and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lowest first: each room may import the ones before it.
ORDER = ("runtime", "models", "export", "calibration", "benchmarks")
RANK = {room: i for i, room in enumerate(ORDER)}


def _module_of(path: Path, root: Path) -> list[str]:
    """dia2_trt.<room>.<sub...> as parts, for a file under ``root/<room>/``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ["dia2_trt", *parts]


def _imported(node: ast.AST, module: list[str], is_package: bool) -> list[tuple[str, str | None]]:
    """(absolute module, imported name or None) for one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module if is_package else module[:-1]
        base = package[:len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [(target, alias.name) for alias in node.names]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(path: Path, root: Path, source: str | None = None) -> list[str]:
    """``file:line: rule`` for every import in ``path`` against the order."""
    module = _module_of(path, root)
    room = module[1]
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        for target, name in _imported(node, module, path.name == "__init__.py"):
            parts = target.split(".")
            if parts[0] != "dia2_trt":
                continue
            if len(parts) == 1:  # from dia2_trt import <room>
                parts, name = ["dia2_trt", name or ""], None
            other = parts[1]
            if other == room:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            at = node.lineno
            if other not in RANK:
                found.append((at, f"{where}: {room} imports {target}, which is no room ({', '.join(ORDER)})"))
            elif RANK[other] > RANK[room]:
                found.append((at, f"{where}: {room} imports {other} ({target}), a room above it; "
                                  f"the order is {' <- '.join(ORDER)}"))
            elif any(_private(p) for p in parts[2:]) or (name and _private(name)):
                shown = f"{target}.{name}" if name else target
                found.append((at, f"{where}: {room} imports the private {shown} from {other}; "
                                  f"give it a public name or keep it in its room"))
    return [line for _, line in sorted(set(found))]  # one per statement and module, in source order


def _room_files(root: Path) -> list[Path]:
    return sorted(p for room in ORDER for p in (root / room).rglob("*.py"))


def test_every_import_follows_the_order():
    files = _room_files(REPO)
    assert {p.relative_to(REPO).parts[0] for p in files} == set(ORDER)  # every room scanned
    found = [line for path in files for line in violations(path, REPO)]
    assert not found, "imports against the room order:\n" + "\n".join(found)


def test_the_check_catches_each_kind_of_violation(tmp_path):
    """The checker itself: upward, lazy, relative and private imports are each reported with file:line."""
    (tmp_path / "export" / "sub").mkdir(parents=True)
    path = tmp_path / "export" / "sub" / "mod.py"
    source = "\n".join([
        "from dia2_trt.runtime.files import write_atomic",  # 1: fine (a room below, public)
        "import dia2_trt.calibration.qdq",  # 2: upward
        "def f():",
        "    from dia2_trt.benchmarks.harness import worker_main",  # 4: upward, lazy
        "from ...calibration import calibrate",  # 5: upward, relative
        "from dia2_trt.runtime.files import _private_helper",  # 6: private name
        "from dia2_trt.models._hidden import thing",  # 7: private module
        "from dia2_trt import calibration",  # 8: upward, by room name
        "from .. import graphs",  # 9: fine (own room)
        "from dia2_trt.runtime.manifest import __doc__",  # 10: fine (dunder)
    ])
    found = violations(path, tmp_path, source)
    lines = [int(v.split(":")[1]) for v in found]
    assert lines == [2, 4, 5, 6, 7, 8], found
    assert found[0].startswith("export/sub/mod.py:2: export imports calibration")
    assert "private dia2_trt.runtime.files._private_helper" in found[3]
    assert "private dia2_trt.models._hidden.thing" in found[4]
