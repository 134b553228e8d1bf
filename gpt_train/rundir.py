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
"""

from __future__ import annotations

import json

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
MANIFEST = "MANIFEST.json"
META = "meta.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_folder(step: int) -> str:
    """A checkpoint's folder, relative to the run directory."""
    return f"{CHECKPOINTS}/{step_name(step)}"


def _step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


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
