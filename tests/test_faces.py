"""The capabilities' faces: widgets, notebooks and benchmarks use each capability only through its
``__init__``, every face is small and in the same shape, and no module grows past 500 lines."""
import ast
import importlib
import json
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("telemetry", "speculative", "partition", "federated", "swarm")
MAX_NAMES = 20  # "about 10-15" names; a face above 15 says why in a comment
MAX_FACE_LINES = 70  # one screen
MAX_MODULE_LINES = 500


def _sources() -> list[tuple[str, str]]:
    """(place, Python source) of every module in widgets/ and benchmarks/ and every notebook cell."""
    out = [(str(p.relative_to(ROOT)), p.read_text()) for d in ("widgets", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                out.append((f"{nb.name} cell {i}", "\n".join(line for line in src.splitlines()
                                                              if not line.lstrip().startswith(("%", "!")))))
    return out


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement; ``import a.b`` gives (a.b, [])."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _violations(source: str) -> list[str]:
    bad = []
    for module, names in _imports(source):
        parts = module.split(".")
        if parts[0] != "adaptive_kit" or len(parts) < 2 or parts[1] not in CAPABILITIES:
            continue
        if len(parts) > 2:
            bad.append(f"imports {module} (past the face of {parts[1]})")
            continue
        face = importlib.import_module(module)  # a submodule only where the face exports it as a family
        bad += [f"imports the submodule {n} from {module}, which does not export it" for n in names
                if isinstance(getattr(face, n, None), types.ModuleType) and n not in face.__all__]
        bad += [f"imports {n}, which {module} does not have" for n in names if not hasattr(face, n)]
    return bad


def test_widgets_notebooks_and_benchmarks_use_only_the_faces():
    found = [f"{place}: {v}" for place, src in _sources() for v in _violations(src)]
    assert not found, "\n".join(found)


def test_the_rule_catches_a_submodule_and_a_name_off_the_face():
    assert _violations("from adaptive_kit.federated.meta import train") != []
    assert _violations("import adaptive_kit.swarm.engine") != []
    assert _violations("from adaptive_kit.federated import meta") != []  # a submodule the face does not export
    assert _violations("from adaptive_kit.federated import data") == []  # a family it does
    assert _violations("from adaptive_kit.federated import train\nfrom adaptive_kit import stats") == []


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_face_is_small_and_names_what_it_exports(capability):
    face = importlib.import_module(f"adaptive_kit.{capability}")
    path = ROOT / "adaptive_kit" / capability / "__init__.py"
    assert face.__doc__ and len(face.__doc__.strip().splitlines()) >= 3, "a docstring with a usage example"
    assert len(path.read_text().splitlines()) <= MAX_FACE_LINES
    assert 5 <= len(face.__all__) <= MAX_NAMES, face.__all__
    assert sorted(face.__all__) == sorted(set(face.__all__)), "no name twice"
    assert all(hasattr(face, n) for n in face.__all__)
    configs = [n for n in face.__all__ if n.endswith("Config")]
    assert configs, "a Config on the face"
    for name in configs:  # frozen dataclasses: a run's configuration cannot change under it
        params = getattr(face, name).__dataclass_params__
        assert params.frozen, f"{capability}.{name} is not frozen"


def test_no_module_over_500_lines_outside_benchmarks():
    long = {str(p.relative_to(ROOT)): n for d in ("adaptive_kit", "widgets") for p in (ROOT / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
