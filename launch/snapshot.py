"""The code a job runs is the code that was submitted: a copy of the package taken at submission.

A SLURM job can start hours after `gpt-train-submit`, and a requeued one days later; a local sweep runs its
elements one after another. By then the checkout may be on another branch, or half-edited. So submission
copies gpt_train/, launch/ and configs/ (the presets) into the job's log folder, LOG_DIR/code-<commit> (a clean
tree: the commit's files) or LOG_DIR/code-<commit>-dirty-<hash> (uncommitted changes: the hash of what was
copied), and the ranks import from there first (PYTHONPATH). The same code submitted twice shares one copy.

PYTHONSAFEPATH=1 goes with it: `python -m` puts the working directory at the front of sys.path, ahead of
PYTHONPATH, and a job started in the checkout would import the checkout again. It exists from Python 3.11;
with an older python in the job the working directory still wins there (launch.slurm.Trainer says so).

"Dirty" is about those three folders only: a change to the tests or the docs does not change what runs.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

PARTS = ("gpt_train", "launch", "configs")
COMMIT_VAR = "GPT_TRAIN_CODE_COMMIT"  # <commit>, <commit>+dirty, or unknown (not a git checkout)
DIR_VAR = "GPT_TRAIN_CODE_DIR"  # the snapshot the ranks import


@dataclass(frozen=True)
class Snapshot:
    source: Path  # the tree holding gpt_train/ (a checkout, or site-packages)
    commit: str  # its git HEAD; "" when it is not the top of a git checkout
    dirty: bool  # PARTS differ from the commit (always, without one)
    files: tuple[str, ...]  # relative to source: what is copied
    path: Path  # LOG_DIR/code-...

    @property
    def label(self) -> str:
        if not self.commit:
            return "unknown"
        return self.commit + ("+dirty" if self.dirty else "")

    def describe(self) -> str:
        if not self.commit:
            state = "not a git checkout"
        elif self.dirty:
            state = "dirty: uncommitted changes in " + " or ".join(f"{p}/" for p in PARTS)
        else:
            state = "clean"
        return f"commit {self.commit or 'unknown'} ({state}), snapshot {self.path}"


def _git(source: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(source), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.decode() if p.returncode == 0 else None


def source_tree() -> Path:
    """Where this process imports gpt_train from: the snapshot copies what the job would otherwise import."""
    import gpt_train

    return Path(gpt_train.__file__).resolve().parent.parent


def _walk(source: Path) -> list[str]:
    out = []
    for part in PARTS:
        for root, dirs, files in os.walk(source / part):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            out += [str(Path(root, f).relative_to(source)) for f in files if not f.endswith(".pyc")]
    return out


def plan(log_dir: str | Path, source: Path | None = None) -> Snapshot:
    """What the snapshot of SOURCE (default: source_tree()) would be, written nowhere (a dry run shows it)."""
    source = (source or source_tree()).resolve()
    top = _git(source, "rev-parse", "--show-toplevel")
    commit = _git(source, "rev-parse", "HEAD") if top and Path(top.strip()).resolve() == source else None
    parts = [p for p in PARTS if (source / p).is_dir()]
    if commit:
        listed = _git(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *parts) or ""
        files = sorted({f for f in listed.split("\0") if f and (source / f).is_file()})  # not deleted ones
        dirty = bool((_git(source, "status", "--porcelain", "--", *parts) or "").strip())
    else:
        files, dirty = sorted(_walk(source)), True
    commit = (commit or "").strip()
    name = f"code-{commit[:12]}" if commit else "code-nogit"
    if dirty:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.encode() + b"\0" + (source / f).read_bytes() + b"\0")
        name += ("-dirty-" if commit else "-") + digest.hexdigest()[:12]
    return Snapshot(source=source, commit=commit, dirty=dirty, files=tuple(files),
                    path=Path(os.path.abspath(log_dir)) / name)


def take(snap: Snapshot) -> Path:
    """Copy the files (once: a snapshot of the same name holds the same code) and return its folder. Into a
    temporary folder first and renamed, so that a job never sees half a copy."""
    if snap.path.is_dir():
        return snap.path
    snap.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = snap.path.parent / f".{snap.path.name}.{uuid.uuid4().hex[:8]}"
    for f in snap.files:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(snap.source / f, tmp / f)
    try:
        os.rename(tmp, snap.path)
    except OSError:  # another submission of the same code made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not snap.path.is_dir():
            raise
    return snap.path


def env(snap: Snapshot, environ: dict[str, str]) -> dict[str, str]:
    """The variables that make a process started with ENVIRON import the snapshot, and name it."""
    old = environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(snap.path) + (os.pathsep + old if old else ""), "PYTHONSAFEPATH": "1",
            COMMIT_VAR: snap.label, DIR_VAR: str(snap.path)}


def shell_lines(snap: Snapshot) -> list[str]:
    """The same, as bash lines for a batch script (the job's own PYTHONPATH kept after the snapshot)."""
    return [
        f"# the code submitted (launch/snapshot.py): {snap.describe()}",
        f'export PYTHONPATH={shlex.quote(str(snap.path))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        "export PYTHONSAFEPATH=1  # python -m would put the working directory (a checkout) ahead of PYTHONPATH",
        f"export {COMMIT_VAR}={shlex.quote(snap.label)} {DIR_VAR}={shlex.quote(str(snap.path))}",
    ]
