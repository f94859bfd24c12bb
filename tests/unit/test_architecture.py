"""The architecture, read from the source: import rules (DESIGN.md), and dvc.yaml's deps and params
that say what each stage reads, so DVC reruns a stage when, and only when, it must."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from imports import PACKAGE, ROOT, direct_imports, module_closure

MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# They change no stage output (where results are logged, how errors print): no stage depends on them.
NOT_DEPS = ("tracking.py", "runner.py")


def name(path: Path) -> str:
    return path.stem if path.stem != "__init__" else "lmtune"


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in MODULES:
        targets = {f for n in direct_imports(path) for f in [_file(n)] if f and f != path}
        graph[name(path)] = {name(t) for t in targets if name(t) != "lmtune"}
    return graph


def _file(module: str):
    from imports import module_file

    return module_file(module)


def test_no_import_cycles():
    graph = package_graph()

    def visit(node, path):
        for target in graph[node]:
            assert target not in path, f"import cycle: {' -> '.join([*path, target])}"
            visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


@pytest.mark.parametrize(
    "module, forbidden",
    [("config", {"*"}), ("data", {"modeling"}), ("metrics", {"tracking"}), ("modeling", {"tracking"}),
     ("lineage", {"*"})],
)  # fmt: skip
def test_import_rules(module, forbidden):
    imported = package_graph()[module]
    assert not (imported if "*" in forbidden else imported & forbidden), f"{module} imports {imported}"


def test_only_tracking_and_the_registry_talk_to_mlflow_and_nothing_imports_stages():
    for path in [*MODULES, *(ROOT / "stages").glob("*.py")]:
        source = path.read_text()
        assert "import stages" not in source and "from stages" not in source, path
        if path.name not in ("tracking.py", "registry.py"):
            assert "import mlflow" not in source and "from mlflow" not in source, path


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_exactly_the_modules_it_uses(stage):
    script = ROOT / "stages" / f"{stage}.py"
    needed = {str(p.relative_to(ROOT)) for p in module_closure(script, skip=NOT_DEPS)}
    listed = {d for d in STAGES[stage]["deps"] if d.startswith("src/lmtune/") and d.endswith(".py")}
    assert f"stages/{stage}.py" in STAGES[stage]["deps"]
    assert listed == needed, f"dvc.yaml {stage}: missing {needed - listed}, not used {listed - needed}"


@pytest.mark.parametrize("stage", [s for s in STAGES if s in ("base", "finetune", "merge", "quantize")])
def test_an_output_folder_carries_exactly_the_params_its_stage_reads(stage):
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", ROOT / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.PARAMS) == STAGES[stage]["params"]


def test_the_base_never_depends_on_the_data_params():
    """Any data edit would rebuild a 13 GB base for llama2_7b."""
    assert not [p for p in STAGES["base"]["params"] if str(p).startswith("data")]
    assert not [d for d in STAGES["base"]["deps"] if str(d).startswith(("data", "${paths.raw"))]
