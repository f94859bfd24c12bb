"""Which lmtune modules a file uses, read from its source (imports inside functions count too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lmtune"


def module_file(name: str) -> Path | None:
    """lmtune.track.runs → src/lmtune/track/runs.py (or a package's __init__.py)."""
    parts = name.split(".")[1:]
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return PACKAGE / "__init__.py" if not parts else None


def direct_imports(path: Path) -> set[str]:
    """lmtune modules named by `import lmtune.x`, `from lmtune.x import y`, `from lmtune import x`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "lmtune"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "lmtune":
                names.add(node.module)
                names |= {
                    f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")
                }
    return names


def module_closure(path: Path, skip: tuple[str, ...] = ()) -> set[Path]:
    """Every package file that `path` needs, directly or through other package modules; the files
    and subpackages named in `skip` are left out, with what only they import."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for name in direct_imports(todo.pop()):
            for prefix in range(
                2, name.count(".") + 2
            ):  # lmtune.a.b imports lmtune/__init__ and lmtune.a too
                file = module_file(".".join(name.split(".")[:prefix]))
                if file and file not in seen and not _skipped(file, skip):
                    seen.add(file)
                    todo.append(file)
            init = PACKAGE / "__init__.py"
            if init not in seen:
                seen.add(init)
                todo.append(init)
    return seen


def _skipped(file: Path, skip: tuple[str, ...]) -> bool:
    return file.name in skip or file.relative_to(PACKAGE).parts[0] in skip
