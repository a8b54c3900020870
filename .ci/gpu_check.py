"""The kit on one device in one command: its device tests, its benchmarks' quick modes and its
notebooks' package calls, with one JSON and one printed table (`make gpu-check`).

Made for a GPU machine whose Python already holds a CUDA PyTorch and cannot reach a package
index: the kit's other requirements that this Python lacks are installed from the wheels that
`make gpu-wheels` downloaded beforehand (``--wheels``), with ``pip install --no-index --target``
into a folder that every stage appends to ``sys.path`` (after the machine's own packages, so
that they shadow nothing). CI runs the same script with ``--device cpu``, where every stage is
cut to a small size (``PLANS``), so that it cannot rot.

Stages, each a subprocess with a time limit, all under one deadline (``--budget-s``):

  tests       pytest on the test files that touch devices (``PLANS[device]["tests"]``); the tests
              parametrised by the ``devices`` fixture run once per device; distributed tests use
              nccl only with >= 2 GPUs, else they say why they skip.
  benchmarks  each benchmark's ``--quick`` mode (``--device`` where the script takes it; the
              others pick CUDA themselves through ``pick_device()``); on the CPU only the swarm's
              overhead section runs, the others parse ``--help`` (imports and options).
  notebooks   every notebook's code cells, in order, as one script with ``ADAPTIVE_KIT_FAST=1``
              (headless: no browser, no kernel; ``display`` prints); on the CPU the tour only,
              as ``make test`` runs them all under nbval.

Usage::

    python3 .ci/gpu_check.py --device cuda --wheels .gpu-wheels --json benchmarks/out/gpu_check.json
    .venv/bin/python .ci/gpu_check.py --device cpu                       # CI: ~45 s, ~30 s of CPU
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what each device runs; a GPU session that finds a stage too slow or too small changes it here
PLANS: dict[str, dict] = {
    "cuda": {
        # a string: one test file per pytest; a tuple: those files in one pytest
        "tests": ["tests/test_devices.py", "tests/test_stats.py", "tests/test_telemetry_collector.py",
                  "tests/test_speculative.py", "tests/test_swarm_engine.py", "tests/test_swarm_groups.py",
                  "tests/test_partition_profile.py", "tests/test_federated_meta.py", "tests/test_distributed.py",
                  "tests/test_swarm_dist.py"],
        "tests_s": 150,
        # (script, extra arguments, seconds); the telemetry overhead models at a batch of 256 once
        # the script takes --batch (it does not yet: the check says so)
        "benchmarks": [("benchmarks/swarm.py", ["--overhead-only", "--members", "64"], 60),
                       ("benchmarks/stats.py", [], 30),
                       ("benchmarks/telemetry.py", ["--batch", "256"], 45),
                       ("benchmarks/speculative.py", [], 30),
                       ("benchmarks/partition.py", [], 30),
                       ("benchmarks/federated.py", [], 30)],
        "not_run": {"benchmarks/dashboard.py": "needs a browser", "benchmarks/reliability.py":
                    "faults and a soak on the CPU; no device path"},
        "notebooks": "*.ipynb",
        "notebook_s": 25,
    },
    "cpu": {
        "tests": [("tests/test_devices.py", "tests/test_swarm_groups.py")],  # one process: one torch import
        "tests_s": 75,
        "benchmarks": [("benchmarks/swarm.py", ["--overhead-only", "--members", "4"], 60)],
        "help_only": ["benchmarks/stats.py", "benchmarks/telemetry.py", "benchmarks/speculative.py",
                      "benchmarks/partition.py", "benchmarks/federated.py"],
        "notebooks": "00_*.ipynb",
        "notebook_s": 40,
    },
}

# runs a module (``-m``-style) or a script with the wheel folder appended to sys.path
BOOT = """
import os, runpy, sys
site, target = sys.argv[1], sys.argv[2]
if site and os.path.isdir(site):
    sys.path.append(site)
sys.argv = sys.argv[2:]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
elif target == "-c":
    exec(sys.argv[1])
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""
# each script's --help in one process (its imports and its options); argv: the scripts
HELP = """
import contextlib, io, os, runpy, sys
for script in sys.argv[2:]:
    sys.argv = [script, "--help"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise SystemExit(f"{script} --help: exit {e.code}")
"""


@dataclass
class Row:
    stage: str  # setup, tests, benchmarks, notebooks
    name: str
    status: str  # pass, fail, skip, timeout
    seconds: float
    detail: str = ""


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output's tail, seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code = None
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return code, out[-4000:], time.perf_counter() - t0


def python(site: Path, target: str, *args: str) -> list[str]:
    return [sys.executable, "-c", BOOT, str(site), target, *args]


TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")  # from pyproject's dev extra


def requirements() -> list[str]:
    """What the check needs besides torch (the machine's own CUDA build): pyproject's
    dependencies and the test tools, as pyproject pins them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = [r for r in project["optional-dependencies"]["dev"] if _name(r) in TEST_TOOLS]
    return [r for r in [*project["dependencies"], *dev] if _name(r) != "torch"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]


def missing_requirements() -> list[str]:
    """The entries of :func:`requirements` that this Python lacks."""
    out = []
    for req in requirements():
        name = _name(req)
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(req)
    return out


def setup(wheels: Path, site: Path) -> Row:
    """Install what this Python lacks from the wheel folder, offline."""
    t0 = time.perf_counter()
    need = missing_requirements()
    if not need:
        return Row("setup", "requirements", "pass", time.perf_counter() - t0, "all present")
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        return Row("setup", "requirements", "fail", time.perf_counter() - t0,
                   f"missing {need} and no wheels in {wheels} (run `make gpu-wheels` where an index is reachable)")
    code, out, s = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                        "--target", str(site), *need], 300)
    return Row("setup", "requirements", "pass" if code == 0 else "fail", s,
               f"installed {need} into {site}" if code == 0 else out[-600:])


def junit_row(xml: Path, name: str, seconds: float, code: int, out: str) -> Row:
    """One test file's row from pytest's JUnit XML: passed / failed / skipped counts, the failed
    tests and the skip reasons."""
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return Row("tests", name, "fail", seconds, f"exit {code}, no report: {out[-300:]}")
    passed = failed = skipped = 0
    failures, reasons = [], set()
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(case.get("name"))
        elif case.find("skipped") is not None:
            skipped += 1
            reasons.add((case.find("skipped").get("message") or "")[:80])
        else:
            passed += 1
    detail = f"{passed} passed, {failed} failed, {skipped} skipped"
    if failures:
        detail += "; failed: " + ", ".join(failures[:5])
    if reasons:
        detail += "; skips: " + " | ".join(sorted(reasons))[:200]
    bad = failed or code not in (0, 5)  # 5: nothing collected
    return Row("tests", name, "fail" if bad else ("pass" if passed else "skip"), seconds, detail)


def notebook_script(path: Path) -> str:
    """A notebook's code cells as one script; IPython magics and shell lines are left out."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = ["try:\n    from IPython.display import display\nexcept ImportError:\n    display = print\n"]
    for c in cells:
        src = "".join(c["source"])
        lines.append("\n".join("pass  # " + ln if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines()))
    return "\n\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels", help="the folder of `make gpu-wheels`")
    parser.add_argument("--site", type=Path, default=ROOT / ".gpu-wheels" / "site",
                        help="where missing packages are installed (appended to sys.path)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock deadline for all stages (cuda 450; cpu 180: about 30 s of CPU time, "
                             "45 s on an idle 2-core machine, which a loaded one stretches)")
    parser.add_argument("--requirements", action="store_true", help="print what the check needs besides torch, and stop")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    plan = PLANS[args.device]
    budget = args.budget_s or (450.0 if args.device == "cuda" else 180.0)
    t_start = time.perf_counter()

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    rows: list[Row] = []
    env = {**os.environ, "ADAPTIVE_KIT_FAST": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    rows.append(setup(args.wheels, args.site))
    import torch  # after setup: only to describe the machine

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        rows.append(Row("setup", "cuda", "fail", 0.0, f"torch {torch.__version__} sees no CUDA device"))
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "device": args.device, "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
               "cpu_count": os.cpu_count()}
    if all(r.status != "fail" for r in rows):
        # tests: one pytest per file, so that a slow file costs only its own row
        tests_end = time.perf_counter() + plan["tests_s"]
        for entry in plan["tests"]:
            files = [entry] if isinstance(entry, str) else list(entry)
            name = " ".join(files)
            limit = min(tests_end - time.perf_counter(), left())
            if not all((ROOT / f).exists() for f in files) or limit < 5:
                rows.append(Row("tests", name, "skip", 0.0, "no such file" if limit >= 5 else "out of time"))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                xml = Path(tmp) / "junit.xml"
                code, out, s = run(python(args.site, "pytest", *files, "-q", "-p", "no:cacheprovider",
                                          f"--junitxml={xml}"), limit, env)
                rows.append(Row("tests", name, "timeout", s, out[-300:].replace("\n", " | ")) if code is None
                            else junit_row(xml, name, s, code, out))
        # benchmarks
        for script, extra, limit in plan["benchmarks"]:
            src = (ROOT / script).read_text()
            extra = list(extra)
            unsupported = [a for a in extra if a.startswith("--") and f'"{a}"' not in src]
            for a in unsupported:  # drop the option and its value
                i = extra.index(a)
                del extra[i:i + (2 if i + 1 < len(extra) and not extra[i + 1].startswith("--") else 1)]
            cmd = ["--quick", *extra]
            note = ""
            if '"--device"' in src:
                cmd += ["--device", args.device]
            else:
                note = "no --device option: device from pick_device(); "
            if unsupported:
                note += f"not supported yet: {' '.join(unsupported)}; "
            if left() < 5:
                rows.append(Row("benchmarks", script, "skip", 0.0, "out of time"))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out_json = Path(tmp) / "out.json"
                code, out, s = run(python(args.site, script, *cmd, "--json", str(out_json)), min(limit, left()), env)
                result = json.loads(out_json.read_text()) if out_json.exists() else None
            status = "timeout" if code is None else ("pass" if code == 0 else "fail")
            detail = note + ("" if status == "pass" else out[-300:].replace("\n", " | "))
            if result is not None and "overhead" in result:
                detail += "x_plain " + ", ".join(f"{r['population']} {r['x_plain']:.2f}" for r in result["overhead"])
            rows.append(Row("benchmarks", f"{script} {' '.join(cmd)}", status, s, detail))
        rows += [Row("benchmarks", script, "skip", 0.0, why) for script, why in plan.get("not_run", {}).items()]
        helps = plan.get("help_only", [])
        if helps and left() < 5:
            rows.append(Row("benchmarks", "--help of " + " ".join(helps), "skip", 0.0, "out of time"))
        elif helps:  # one process imports them all: torch is imported once
            code, out, s = run(python(args.site, "-c", HELP, *helps), min(60, left()), env)
            rows.append(Row("benchmarks", "--help of " + " ".join(helps),
                            "timeout" if code is None else ("pass" if code == 0 else "fail"), s,
                            "" if code == 0 else out[-300:].replace("\n", " | ")))
        # notebooks
        for nb in sorted((ROOT / "notebooks").glob(plan["notebooks"])):
            if left() < 5:
                rows.append(Row("notebooks", nb.name, "skip", 0.0, "out of time"))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                script = Path(tmp) / (nb.stem + ".py")
                script.write_text(notebook_script(nb))
                nb_env = {**env, "PYTHONPATH": str(ROOT)}
                code, out, s = run(python(args.site, str(script)), min(plan["notebook_s"], left()), nb_env,
                                   cwd=ROOT / "notebooks")
            rows.append(Row("notebooks", nb.name, "timeout" if code is None else ("pass" if code == 0 else "fail"),
                            s, "" if code == 0 else out[-300:].replace("\n", " | ")))
    total = time.perf_counter() - t_start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = children.ru_utime + children.ru_stime
    failed = [r for r in rows if r.status in ("fail", "timeout")]
    print(f"\n== gpu-check on {args.device} ({', '.join(machine['gpus']) or 'no GPU'}; torch {torch.__version__}; "
          f"{total:.0f} s of {budget:.0f} s, {cpu_s:.0f} s of CPU time) ==")
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.stage:<10} {r.status:<7} {r.seconds:7.1f}s  {r.name:<{width}}  {r.detail}")
    print(f"{len(rows) - len(failed)} of {len(rows)} rows passed or skipped; {len(failed)} failed or timed out")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "budget_s": budget, "runtime_s": round(total, 1), "cpu_s": round(cpu_s, 1),
                                     "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
