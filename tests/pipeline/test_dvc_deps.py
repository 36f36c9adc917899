"""Every DVC stage depends on exactly the code it runs and on whole params sections it reads.

The code a stage runs is the import closure of its entry module (``pipelines/<command>.py``
for ``vitalrisk <command>``, plus ``pipelines/cli.py``), found statically: every ``import``
anywhere in a module, lazy imports inside functions included (a stage may take them
depending on params), ``if TYPE_CHECKING:`` blocks excluded, and the package ``__init__``
files on the way that hold code. The test fails on a missing dependency (``dvc repro`` would
skip a stage that should rerun) and on an extra one (a stage would rerun for nothing), and
prints the list to paste into ``dvc.yaml``.

Params: a stage declares whole sections (``- features``, not ``- features.windows``), and
exactly the sections its entry module names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "governance", "ingest", "simulate", "features", "models", "serving")
PACKAGES += ("monitoring", "pipelines")


def module_file(name: str) -> Path | None:
    """The file of module ``name`` if it is one of ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, name: str) -> set[str]:
    """Module names ``path`` (module ``name``) imports, anywhere but TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # submodules, if any
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # a docstring alone is not code
    return bool(body)


def import_closure(roots: list[str]) -> set[str]:
    """Repository paths of every module of ours reachable from ``roots``."""
    seen: set[str] = set()
    todo = list(roots)
    files: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parts[:i]))
        path = module_file(name)
        if path is None:
            continue
        if path.name != "__init__.py" or _has_code(path):
            files.add(path.relative_to(ROOT).as_posix())
        todo += [m for m in imported_modules(path, name) if module_file(m) is not None]
    return files


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _command(stage: dict) -> str:
    words = " ".join(stage["cmd"].split()).split()
    assert words[0] == "vitalrisk", f"stage command {stage['cmd']!r} is not vitalrisk"
    return words[1]


def _declared_code(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.endswith(".py") or d.split("/")[0] in PACKAGES}


STAGES = _stages()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_are_the_import_closure(name):
    stage = STAGES[name]
    want = import_closure([f"pipelines.{_command(stage)}", "pipelines.cli"])
    got = _declared_code(stage)
    missing, extra = sorted(want - got), sorted(got - want)
    listing = "\n".join(f"      - {p}" for p in sorted(want))
    assert not missing and not extra, (
        f"stage {name}: code deps missing {missing}, extra {extra}; the list is:\n{listing}"
    )


def _sections_named(path: Path, sections: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in sections
    }


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_params_are_whole_sections_it_reads(name):
    stage = STAGES[name]
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    declared = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
    dotted = [p for p in declared if "." in p]
    assert not dotted, f"stage {name}: declare whole sections, not keys: {dotted}"
    entry = ROOT / "pipelines" / f"{_command(stage)}.py"
    want = _sections_named(entry, sections)
    assert set(declared) == want, f"stage {name}: params {sorted(declared)}, reads {sorted(want)}"


def test_closure_finds_lazy_imports_and_skips_type_checking(tmp_path, monkeypatch):
    """The scanner itself: a lazy import counts, a TYPE_CHECKING one does not."""
    assert "features/dask_backend.py" in import_closure(["pipelines.features"])  # lazy import
    assert "features/families/windows.py" in import_closure(["pipelines.features"])
    closure = import_closure(["features.plan"])
    assert "features/config.py" not in closure  # only under TYPE_CHECKING there
