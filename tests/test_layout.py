"""The layout rules of src/: stage packages in data-flow order, no upward import, no import cycle, small modules."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# Data flows left to right; a package may import the shared top level and the packages before it, never after.
STAGES = ("synth", "data", "cnn", "stack", "evaluate", "triage")
MAX_LINES = 340  # "~300": a module past this is asking to be split by role


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every src.* module a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (SRC.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (SRC.parent / candidate.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("src"))
    return found


def stage_of(module: str) -> int:
    """-1 for the shared top level, else the position of the module's stage package."""
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else -1


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_stage_is_a_package_and_top_level_is_shared_only():
    for stage in STAGES:
        assert (SRC / stage / "__init__.py").exists(), stage
    top = {m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in STAGES}
    assert top <= {"src.constants", "src.paths", "src.config", "src.config_checks", "src.errors", "src.atomic",
                   "src.markdown", "src.metric", "src.predictions", "src.naming", "src.provenance",
                   "src.stage_settings", "src.cpus"}, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = stage_of(module)
    for imported in GRAPH[module]:
        assert stage_of(imported) <= mine, f"{module} imports {imported}, a later stage"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_cycle_detector_finds_a_cycle():
    # The check above must be able to fail: a two-module loop in a copy of the graph is reported.
    global GRAPH
    saved = GRAPH
    GRAPH = {**saved, "src.constants": {"src.paths"}, "src.paths": {"src.constants"}}
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycle()
    finally:
        GRAPH = saved


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]}: {n} lines; split it by role"


def test_shared_column_names_are_declared_once():
    # STUDY, SERIES and friends live in src/constants.py; a module re-declaring the DICOM names drifts.
    for module, path in MODULES.items():
        if module == "src.constants":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                assert node.value.value not in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"), (
                    f"{path}:{node.lineno} re-declares {node.value.value!r}; import it from src.constants")
