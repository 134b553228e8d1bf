"""`gpt-train cancel RUN [--wait SECONDS]`: stop a run cleanly, with a checkpoint and no requeue, through whatever
owns it (gpt_train/owner.py: scancel, SIGTERM to the local launcher, docker stop), then record that it was
cancelled, so that `gpt-train runs` shows it stopped rather than waiting to be requeued.

The record is written only once the run directory has no writer: the owner is gone (the job ended, the launcher
exited, the container stopped) and RUN/lease.json is released (or stale). Its writer then is this command, the
one writer of the run directory for that moment:

    {"event": "cancelled", "time": ..., "step": ..., "by": "user@host", "via": "ran scancel 1234"}

A start after it (someone started the run again) makes it history: the run is whatever that start made it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import time

import yaml

from gpt_train import owner, rundir
from gpt_train.errors import UserError
from gpt_train.recovery import ENDS, attempts
from gpt_train.runlog import read_jsonl
from gpt_train.runs import CANCELLED, after_newest_start, newest_start
from gpt_train.storage import Store

POLL_S = 1.0
LEASE_STALE_S = 120.0  # checkpoint.lease_stale_s when the run's config.yaml does not say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (local path or fsspec URL)")
    parser.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for the checkpoint and the stop (default 300)")


def run(args: argparse.Namespace) -> int:
    store = Store(args.run)
    url = store.url
    if not store.exists():
        raise UserError(f"no run at '{args.run}'")
    events = read_jsonl(store, rundir.EVENTS)
    start = newest_start(events)
    if start is None:
        raise UserError(f"{url} has no start event: no attempt of it has run, so there is nothing to cancel")
    done = next((e for e in after_newest_start(events) if e.get("event") == CANCELLED), None)
    if done is not None:
        print(f"gpt-train cancel: {url} was already cancelled by {done.get('by', '?')} at step {done.get('step')}")
        return 0
    last = attempts(events, read_jsonl(store, rundir.METRICS))[-1]
    if last.end == "finish":
        raise UserError(f"{url} finished at step {last.last_step}: nothing to cancel")
    own = owner.of(start)
    if own.launcher is None:
        raise UserError(f"the newest start event of {url} names no launcher (no slurm_job, supervisor_pid or "
                        "container): stop it where it runs (Ctrl-C, or SIGTERM to its process)")
    live = owner.alive(own)
    if live is False:
        raise UserError(f"{url} is not running: {own.describe()} is gone (the last attempt "
                        + (f"{ENDS[last.end]} at step {last.last_step})" if last.end else "left no end record)"))
    if live is None:
        raise UserError(f"cannot tell from here whether {own.describe()} still runs {url}: run gpt-train cancel "
                        "where it was started")
    was_training = last.end is None
    via = owner.stop(own, args.wait)
    print(f"gpt-train cancel: {via}; waiting up to {args.wait:g}s for {url} to stop", flush=True)
    deadline = time.monotonic() + args.wait
    while (why := still_running(store, own)) is not None:
        if time.monotonic() > deadline:
            raise UserError(f"{url} did not stop within {args.wait:g}s after {via}: {why}")
        time.sleep(POLL_S)
    events = read_jsonl(store, rundir.EVENTS)
    end = next((e for e in reversed(after_newest_start(events)) if e.get("event") in ENDS), None)
    step = end.get("step") if end else attempts(events, read_jsonl(store, rundir.METRICS))[-1].last_step
    append_event(store, {"event": CANCELLED, "time": time.time(), "step": step, "by": who(), "via": via})
    if not was_training:
        print(f"cancelled {url}: it was not training ({own.describe()} waited to start it again); it stays at step "
              f"{step}")
        return 0
    if end is not None and end.get("event") == "preempted" and end.get("checkpoint_landed"):
        print(f"cancelled {url}: stopped at step {step} with a checkpoint; {own.describe()} is gone and will not "
              "start it again")
        return 0
    what = f"{end['event']}: {end.get('cause')}" if end else "no end record (killed before it could write one?)"
    raise UserError(f"{url} stopped at step {step} without a checkpoint of that step ({what}); recorded as "
                    "cancelled: a resume continues from the newest checkpoint")


def still_running(store: Store, own: owner.Owner) -> str | None:
    """Why the run may still write its run directory, or None once it cannot: its owner is gone (or no longer
    known: a job that SLURM has forgotten) and the lease is released or stale."""
    if owner.alive(own):
        return f"{own.describe()} is still there"
    try:
        holder = json.loads(store.read_text(rundir.LEASE))
    except FileNotFoundError:
        return None
    except ValueError:
        holder = {}
    beat = holder.get("heartbeat") if isinstance(holder, dict) else None
    stale = lease_stale_s(store)
    if isinstance(beat, (int, float)) and time.time() - beat <= stale:
        return f"{rundir.LEASE} is still held (heartbeat {time.time() - beat:.0f}s ago; stale after {stale:g}s)"
    return None


def lease_stale_s(store: Store) -> float:
    try:
        config = yaml.safe_load(store.read_text(rundir.CONFIG)) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return LEASE_STALE_S
    value = (config.get("checkpoint") or {}).get("lease_stale_s") if isinstance(config, dict) else None
    return float(value) if isinstance(value, (int, float)) else LEASE_STALE_S


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def append_event(store: Store, record: dict) -> None:
    """One record at the end of events.jsonl, written whole (an object store cannot append)."""
    try:
        text = store.read_text(rundir.EVENTS)
    except FileNotFoundError:
        text = ""
    if text and not text.endswith("\n"):
        text += "\n"  # a line cut short by a kill stays unreadable, and alone on its line
    store.write_text(rundir.EVENTS, text + json.dumps(record) + "\n")
