"""The architecture, read from the source: import rules, and dvc.yaml's deps and params that say
what each stage reads, so DVC reruns a stage when, and only when, it must."""

from pathlib import Path

import pytest
import yaml
from imports import PACKAGE, ROOT, direct_imports, module_closure, module_file
from omegaconf import OmegaConf

from lmtune.config import NO_OUTPUT_KEYS, flatten, identity, select

MODULES = sorted(PACKAGE.rglob("*.py"))
# a `foreach` stage (align's) as its `do` template
STAGES = {
    name: spec.get("do", spec)
    for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
}
PARAMS = OmegaConf.create((ROOT / "params.yaml").read_text())
# They change no stage output (where results are logged, how commands and errors print): no stage
# depends on them.
NOT_DEPS = ("track", "pipeline", "tools")
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def unit(path: Path) -> str:
    """What dvc.yaml lists for a package file: its subpackage's folder, or the file at the top."""
    rel = path.relative_to(PACKAGE)
    return f"src/lmtune/{rel.parts[0]}" if len(rel.parts) > 1 else f"src/lmtune/{rel}"


def name(path: Path) -> str:
    """lmtune.data.sources for src/lmtune/data/sources.py; lmtune.data for its __init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(["lmtune", *(p for p in parts if p != "__init__")])


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in MODULES:
        targets = {f for n in direct_imports(path) for f in [module_file(n)] if f and f != path}
        graph[name(path)] = {name(t) for t in targets if name(t) != "lmtune"}
    return graph


def test_no_import_cycles():
    graph = package_graph()

    def visit(node, path):
        for target in graph[node]:
            assert target not in path, f"import cycle: {' -> '.join([*path, target])}"
            visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


PARTS = {
    f"lmtune.{name}"
    for name in (
        "base",
        "data",
        "model",
        "train",
        "align",
        "evaluate",
        "export",
        "track",
        "pipeline",
        "tools",
    )
}
AROUND = {"lmtune.track", "lmtune.pipeline", "lmtune.tools"}  # around the stages: never in stage code
RULES = [
    ("lmtune.config", {"*"}),  # the schema stands alone
    ("lmtune.base", PARTS - {"lmtune.base"}),  # the base is built from its own code only
    ("lmtune.data", PARTS - {"lmtune.data"}),
    ("lmtune.model", PARTS - {"lmtune.model", "lmtune.data", "lmtune.export"}),
    ("lmtune.evaluate", AROUND),
    ("lmtune.export", AROUND),
    ("lmtune.train", AROUND | {"lmtune.align"}),  # SFT never needs preference code
    ("lmtune.align", AROUND),
    ("lmtune.pipeline", {"lmtune.tools"}),  # the core runs without the tools users add on top
    ("lmtune.track.lineage", {"*"}),
]


@pytest.mark.parametrize("package, forbidden", RULES)
def test_import_rules(package, forbidden):
    """A module of `package` never imports a module of a forbidden package ("*": of any)."""
    for module, imported in package_graph().items():
        if module == package or module.startswith(package + "."):
            bad = (
                imported
                if "*" in forbidden
                else {i for i in imported if any(i == f or i.startswith(f + ".") for f in forbidden)}
            )
            assert not bad, f"{module} imports {sorted(bad)}"


def test_only_tracking_and_the_registry_talk_to_mlflow_and_nothing_imports_stages():
    for path in [*MODULES, *(ROOT / "stages").glob("*.py")]:
        source = path.read_text()
        assert "import stages" not in source and "from stages" not in source, path
        if path.parent.name != "track":
            assert "import mlflow" not in source and "from mlflow" not in source, path


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_exactly_the_package_parts_it_uses(stage):
    script = ROOT / "stages" / f"{stage}.py"
    needed = {unit(p) for p in module_closure(script, skip=NOT_DEPS)}
    listed = {d for d in STAGES[stage]["deps"] if d.startswith("src/lmtune/")}
    assert f"stages/{stage}.py" in STAGES[stage]["deps"]
    assert listed == needed, f"dvc.yaml {stage}: missing {needed - listed}, not used {listed - needed}"


def test_no_stage_depends_on_the_tracking_or_command_code_and_the_base_on_little():
    for stage, spec in STAGES.items():
        around = ("src/lmtune/track", "src/lmtune/pipeline", "src/lmtune/tools")
        assert not [d for d in spec["deps"] if d.startswith(around)], stage
    assert {d for d in STAGES["base"]["deps"] if d.startswith("src/lmtune/") and "." not in Path(d).name} == {
        "src/lmtune/base"
    }


@pytest.mark.parametrize("stage", [s for s in STAGES if s in ("base", "finetune", "merge", "quantize")])
def test_an_output_folder_carries_exactly_the_params_its_stage_reads(stage, tmp_path):
    """The stage's params are declared once, in dvc.yaml: its output folder's config.yaml holds
    exactly those keys, read from there."""
    import yaml

    from lmtune.artifacts import save_config
    from lmtune.pipeline.runner import stage_params

    save_config(PARAMS, tmp_path, tuple(stage_params(stage, ROOT / "dvc.yaml")))
    written = set(flatten(yaml.safe_load((tmp_path / "config.yaml").read_text())))
    assert written == leaf_keys(STAGES[stage]["params"]) and written
    assert "stage_params(STAGE)" in (ROOT / "stages" / f"{stage}.py").read_text()


def leaf_keys(keys) -> set[str]:
    """The params.yaml leaf keys that a list of sections and keys (as dvc.yaml lists them) covers."""
    return set(flatten(select(PARAMS, tuple(keys))))


def test_no_stage_reruns_for_a_key_that_changes_no_output_and_every_other_key_reruns_one():
    """dvc.yaml's params lists agree with the configuration's identity (lmtune.config.identity):
    the keys it leaves out rerun no stage; every other key but the output paths reruns some stage."""
    tracked = set().union(*(leaf_keys(spec.get("params", [])) for spec in STAGES.values()))
    everything = set(flatten(PARAMS))
    no_output = {k for k in everything if any(k == n or k.startswith(n + ".") for n in NO_OUTPUT_KEYS)}
    assert no_output, "NO_OUTPUT_KEYS names no key of params.yaml"
    assert not tracked & no_output
    assert everything - tracked - no_output == {k for k in everything if k.startswith("paths.")}


def test_the_identity_ignores_exactly_the_keys_that_change_no_output():
    base = identity(PARAMS)
    for key in ("train.threads", "train.checkpoint_every", "train.keep_checkpoints", "tracking.uri"):
        assert identity(OmegaConf.merge(PARAMS, OmegaConf.from_dotlist([f"{key}=7"]))) == base, key
    for key in ("train.lr", "lora.r", "seed", "eval.batch_size"):
        assert identity(OmegaConf.merge(PARAMS, OmegaConf.from_dotlist([f"{key}=7"]))) != base, key


def test_the_base_never_depends_on_the_data_params():
    """Any data edit would rebuild a 13 GB base for llama2_7b."""
    assert not [p for p in STAGES["base"]["params"] if str(p).startswith("data")]
    assert not [d for d in STAGES["base"]["deps"] if str(d).startswith(("data", "${paths.raw"))]


def test_every_subpackage_is_named_in_the_layout():
    assert SUBPACKAGES == [
        "align",
        "base",
        "data",
        "evaluate",
        "export",
        "model",
        "pipeline",
        "rl",
        "tools",
        "track",
        "train",
    ]


def test_the_committed_dvc_lock_is_that_of_the_committed_code():
    """Each stage's recorded dependencies in dvc.lock (its code, params and data) equal the files
    here, so the committed dvc.lock and metrics/ say which code made them. Needs no DVC cache (the
    outputs may be absent: a fresh clone). After an edit to what a stage depends on, rerun the
    pipeline (`make run`) and commit its dvc.lock and metrics/ with the edit."""
    import json
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([dvc, "status", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    # "deleted" is an upstream output a fresh clone does not have (no cache); only a dependency
    # that exists and differs from what dvc.lock recorded makes the record stale.
    stale = {
        stage: changed
        for stage, entries in json.loads(result.stdout or "{}").items()
        for entry in entries
        if isinstance(entry, dict)
        and (changed := {dep: how for dep, how in entry.get("changed deps", {}).items() if how != "deleted"})
    }
    assert not stale, f"dvc.lock was written by other code or params than these: {stale}"
