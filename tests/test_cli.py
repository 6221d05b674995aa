"""The command line: one flag vocabulary with deprecated spellings still accepted (and announced), every
library command reachable as ``python -m modeling COMMAND``, and ``modeling`` free of import cycles
with every module importable on its own."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from modeling.cli import COMMANDS, add_flag, parse
from modeling.paths import shown_path


def test_old_flag_spellings_fill_the_new_flag_and_print_a_notice(capsys):
    ap = argparse.ArgumentParser(prog="x")
    add_flag(ap, "--output-dir", old=("--out", "--output"), required=True)
    add_flag(ap, "--model", old=("--reference",))
    args = parse(ap, ["--out", "d", "--reference", "m"])
    assert (args.output_dir, args.model) == ("d", "m")
    err = capsys.readouterr().err
    assert "--out is deprecated" in err and "use --output-dir" in err and "--reference is deprecated" in err
    assert parse(ap, ["--output-dir", "e"]).output_dir == "e" and not capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(ap, ["--model", "m"])  # still required under either spelling
    assert "--output-dir" in capsys.readouterr().err


def test_reports_record_paths_below_the_working_directory_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space" / "model").mkdir(parents=True)
    assert shown_path(tmp_path / "space" / "model") == "space/model"
    assert shown_path("space/model") == "space/model"
    assert shown_path(tmp_path.parent / "shared" / "data") == "../shared/data"  # beside the checkout
    assert shown_path("/proc/self") == "/proc/self"  # elsewhere: as given


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command):
    proc = subprocess.run([sys.executable, "-m", "modeling", command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--model" in proc.stdout


def _module_imports(path: Path) -> set[str]:
    """Sibling modules of ``modeling`` that ``path`` imports, at any depth (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("modeling."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("modeling."))
    return out


def test_modeling_has_no_import_cycle():
    mods = {p.stem: _module_imports(p) for p in (ROOT / "modeling").glob("*.py") if p.stem != "__main__"}
    mods = {k: {m for m in v if m in mods} for k, v in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(mods[n]):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(mods):
        if n not in state:
            visit(n, [n])
    # and nothing in modeling imports the project's other packages (dependencies point one way)
    for p in (ROOT / "modeling").glob("*.py"):
        text = p.read_text()
        for other in ("dataset_scripts", "space", "train", "benchmarks", "scripts"):
            assert f"from {other}" not in text and f"import {other}" not in text, (p.name, other)


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "modeling").glob("*.py")
                                          if p.stem not in ("__init__", "__main__")))
def test_each_modeling_module_imports_on_its_own(module):
    proc = subprocess.run([sys.executable, "-c", f"import modeling.{module}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_console_command_is_installed_and_answers_help(name):
    """`pip install -e .` (scripts/dev.sh setup) puts each [project.scripts] entry beside the interpreter."""
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.skip(f"{name} is not installed in this environment (run `pip install -e .`)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
