"""The package's shape, checked from its imports: steps build on the layers below and never on each
other, the layers below never reach up, providers know nothing of the pipeline, every GPULINE_* input
is read in one place, and modules and functions stay small enough to read."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scripts" / "gpuline"
TRAINER = ROOT / "trainer" / "gpuline_trainer"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(root: Path = PACKAGE) -> list[Path]:
    return sorted(root.rglob("*.py"))


def name_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at the top or inside a function (``from gpuline import x`` gives
    ``gpuline.x`` too, since x may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_checks_see_the_whole_package() -> None:
    names = {name_of(p) for p in modules()}
    assert {"gpuline.cli", "gpuline.steps.provision", "gpuline.steps.pipeline", "gpuline.contract"} <= names


def test_steps_never_import_each_other_only_the_pipeline_composes_them() -> None:
    wrong = []
    for path in modules(PACKAGE / "steps"):
        me = name_of(path)
        if me in ("gpuline.steps", "gpuline.steps.pipeline"):
            continue
        wrong += [f"{me} imports {n}" for n in imports(path) if within(n, "gpuline.steps") and n != me]
    assert wrong == []


def test_the_layers_below_the_steps_never_reach_up() -> None:
    wrong = []
    for path in modules():
        me = name_of(path)
        if within(me, "gpuline.steps") or me == "gpuline.cli":
            continue
        wrong += [f"{me} imports {n}" for n in imports(path) if within(n, "gpuline.steps") or n == "gpuline.cli"]
    assert wrong == []


def test_providers_know_nothing_of_the_pipeline() -> None:
    # A provider reports failures through its result (failover), never to GitHub or the run record.
    forbidden = ("gpuline.gha", "gpuline.github", "gpuline.context", "gpuline.stage", "gpuline.render")
    wrong = []
    for path in modules(PACKAGE / "providers"):
        wrong += [f"{name_of(path)} imports {n}" for n in imports(path) if any(within(n, f) for f in forbidden)]
    assert wrong == []


def _env_reads(path: Path) -> Iterator[tuple[int, str]]:
    """``os.environ.get("GPULINE_X")``, ``environ["GPULINE_X"]``, ``os.getenv("GPULINE_X")``: reads
    of an input by a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in ("get", "getenv", "pop"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("GPULINE_"):
            yield node.lineno, key.value


def test_gpuline_inputs_are_named_in_the_contract_and_never_read_by_a_literal_name() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in [*modules(), *modules(TRAINER)]
        for line, name in _env_reads(path)
    ]
    assert found == []


@pytest.mark.parametrize("path", [*modules(), *modules(TRAINER)], ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_fit_on_a_screen(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
