"""The layout of a run directory, in one place, without torch: the trainer writes it, `status`, `plot`,
`env` and the launchers read it.

    RUN/config.yaml                      the resolved config of the latest start
    RUN/run.json                         the run's id and creation time
    RUN/metrics.jsonl                    one record per logged step
    RUN/events.jsonl                     start, resume, preempted, finish
    RUN/samples.jsonl                    text samples (step, text)
    RUN/checkpoints/step-00001200/       one checkpoint (see checkpoint.py); MANIFEST.json written last
    RUN/checkpoints/LATEST               the newest step folder's name, written after its manifest
    RUN/rolled-back/step-00001500/       checkpoints set aside by a rollback (resume=best); never pruned
    RUN/lease.json                       who is writing this run now (host, pid, job, heartbeat)
    RUN/diagnostics/attempt-3/           what the hang watchdog dumped in that attempt (see watchdog.py)
"""

from __future__ import annotations

import hashlib
import json

from gpt_train.errors import CheckpointError
from gpt_train.storage import Store

CONFIG = "config.yaml"
RUN = "run.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SAMPLES = "samples.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = f"{CHECKPOINTS}/LATEST"
ROLLED_BACK = "rolled-back"
LEASE = "lease.json"
DIAGNOSTICS = "diagnostics"
MANIFEST = "MANIFEST.json"
META = "meta.json"
FORMAT = "gpt-train-checkpoint/1"  # a checkpoint manifest's "format"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_folder(step: int) -> str:
    """A checkpoint's folder, relative to the run directory."""
    return f"{CHECKPOINTS}/{step_name(step)}"


def _step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def list_rolled_back(store: Store) -> list[int]:
    """Steps of the checkpoint folders under RUN/rolled-back, oldest first."""
    return sorted(s for s in map(_step_of, store.listdir(ROLLED_BACK)) if s is not None)


def list_steps(store: Store) -> list[tuple[int, bool]]:
    """(step, has manifest) for each step folder under RUN/checkpoints, oldest first."""
    out = []
    for name in store.listdir(CHECKPOINTS):
        step = _step_of(name)
        if step is not None:
            out.append((step, store.exists(f"{CHECKPOINTS}/{name}/{MANIFEST}")))
    return sorted(out)


def manifested_steps(store: Store) -> list[int]:
    """Steps whose folder has a manifest: candidates, verified only when loaded."""
    return [s for s, complete in list_steps(store) if complete]


def read_meta(store: Store, step: int) -> dict:
    """A checkpoint's meta.json as written (not verified against the manifest: for reports and retention)."""
    return json.loads(store.read_text(f"{step_folder(step)}/{META}"))


# -- verifying a checkpoint folder: the rule checkpoint.load applies, without torch ---------------------

def read_manifest(folder: Store) -> dict:
    """A checkpoint folder's manifest; CheckpointError says why the folder is not a checkpoint."""
    try:
        manifest = json.loads(folder.read_text(MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"'{folder.url}' has no {MANIFEST}: not a checkpoint, or one whose writing never finished") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{folder.url}/{MANIFEST}' is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"'{folder.url}' is not a gpt-train checkpoint (manifest format {found!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or META not in files or not all(isinstance(e, dict) for e in files.values()):
        raise CheckpointError(f"'{folder.url}/{MANIFEST}' does not list the checkpoint's files")
    return manifest


def read_verified(folder: Store, manifest: dict, name: str) -> bytes:
    """A file the manifest lists, only if its size and sha256 are the manifest's."""
    data = read_sized(folder, manifest, name)
    if hashlib.sha256(data).hexdigest() != manifest["files"][name].get("sha256"):
        raise CheckpointError(f"'{folder.url}/{name}' does not match its manifest (checksum): corrupt")
    return data


def read_sized(folder: Store, manifest: dict, name: str) -> bytes:
    """A file the manifest lists, only if its size is the manifest's (the checksum is not computed)."""
    try:
        data = folder.read_bytes(name)
    except FileNotFoundError:
        raise CheckpointError(f"'{folder.url}/{name}' is listed in the manifest but missing") from None
    if len(data) != manifest["files"][name].get("bytes"):
        raise CheckpointError(f"'{folder.url}/{name}' does not match its manifest (size): corrupt")
    return data


def read_verified_meta(folder: Store, manifest: dict) -> dict:
    """The checkpoint's meta.json, verified and parsed: a matching checksum only says the file is the one
    written, and a file written by hand can match its own hand-written manifest."""
    data = read_verified(folder, manifest, META)
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or type(meta.get("step")) is not int:
        raise CheckpointError(f"'{folder.url}/{META}' is not a JSON object with the checkpoint's step")
    return meta


def verify(store: Store, step: int) -> str | None:
    """Why the run's checkpoint of `step` would not load, or None when every file it lists verifies and its
    meta.json reads.

    Reads every byte of the checkpoint, one file at a time; what it does not check is what only loading
    can: that the files unpickle into tensors."""
    folder = Store(f"{store.url}/{step_folder(step)}")
    try:
        manifest = read_manifest(folder)
        for name in manifest["files"]:
            if name != META:
                read_verified(folder, manifest, name)
        read_verified_meta(folder, manifest)
    except CheckpointError as e:
        return str(e)
    return None
