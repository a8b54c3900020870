"""pyproject.toml is the single source of dependencies; environment.yml must mirror it."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {}
    for spec in project["dependencies"]:
        req = Requirement(spec)
        pypi[_norm(CONDA_NAMES.get(req.name, req.name))] = str(req.specifier)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda, pip_section = {}, None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_section = dep["pip"]
            continue
        name, _, spec = re.match(r"([A-Za-z0-9_.\-]+)(([<>=!~]=?)?.*)", dep).group(1, 2, 2)
        conda[_norm(name)] = spec
    assert conda.pop("python") == "=3.11"
    assert conda.pop("pip") == ""
    assert conda == pypi, "environment.yml and pyproject.toml list different dependencies"
    assert pip_section == ["-e .[dev]"]


def test_dev_extra_has_the_test_tools():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {_norm(Requirement(s).name) for s in extras["dev"]}
    assert {"pytest", "nbval", "hypothesis", "playwright", "ruff"} <= names


def test_importing_the_core_loads_no_ui_code():
    code = ("import sys, adaptive_kit; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('bokeh', 'ipywidgets', 'jupyter_bokeh', 'widgets', 'IPython')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_core_sources_never_import_ui_packages():
    pattern = re.compile(r"^\s*(import|from)\s+(bokeh|ipywidgets|jupyter_bokeh|widgets)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "adaptive_kit").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []
