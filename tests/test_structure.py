"""The code's shape, checked from its source: no import circle between the project's modules, no
function in launcher/ with more than 8 parameters, shared names defined once, and no file that
points a reader at a document the repository does not hold."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "launcher", "rmsnet", "bench")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in it (a lazy import inside a function is
    still a dependency, so it counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_project_has_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package's __init__ is imported by its submodules implicitly; only explicit edges count
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_no_function_in_the_launcher_takes_more_than_8_parameters():
    wide = []
    for path in sorted((ROOT / "launcher").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                names = [n for n in names if n not in ("self", "cls")]
                n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
                if n > 8:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not wide, "functions with more than 8 parameters: " + ", ".join(wide)


@pytest.mark.parametrize("literal", ['"manifest.json"', '"SYNTHETIC.json"'])
def test_shared_file_names_are_defined_once(literal):
    """The shard directory's manifest and the synthetic marker have one definition each
    (data_pipeline/manifest.py); every other module imports the name."""
    hits = [str(p.relative_to(ROOT)) for p in _modules().values() if literal in p.read_text()]
    assert hits == ["data_pipeline/manifest.py"], hits


def _tracked_text_files():
    for pattern in ("*.py", "*.md", "*.sh", "*.yaml", "*.toml", "*.cfg", "Makefile", "*.sbatch"):
        for path in ROOT.rglob(pattern):
            rel = path.relative_to(ROOT)
            if rel.parts[0] in (".venv", "demo_runs", ".git") or ".egg-info" in str(rel):
                continue
            yield path


def test_every_document_a_file_names_is_in_the_repository():
    """A reader who follows a pointer to a design note finds it: every markdown file under docs/
    that a file names exists, and nothing names a design document the project does not ship."""
    missing = []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for ref in re.findall(r"\bdocs/[\w./-]+\.md\b", text):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
        for ref in re.findall(r"\b(?:DESIGN|STYLE)\.md\b", text):
            missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "names a document the repository does not hold: " + ", ".join(missing)


def test_no_launcher_module_shadows_a_module_onnxruntime_quantization_imports_by_bare_name():
    """onnxruntime.quantization appends onnxruntime/transformers to sys.path and imports its modules
    by bare name (`onnx_model`, ...); run as a script, launcher/ is sys.path[0] and would win."""
    ort = pytest.importorskip("onnxruntime")
    bare = {p.stem for p in (Path(ort.__file__).parent / "transformers").glob("*.py")}
    assert len(bare) > 10  # the folder is where this test expects it
    ours = {p.stem for p in (ROOT / "launcher").glob("*.py")} - {"__init__"}
    assert not ours & bare, f"launcher/ modules named like onnxruntime/transformers ones: {sorted(ours & bare)}"
