"""`gpt-train runs [ROOT_OR_RUN ...] [--json] [--watch [SECONDS]]`: many runs at a glance, one line each.

Each argument is a run directory, or a folder searched one and two levels down for run directories (folders with
events.jsonl or checkpoints/); local paths, globs and fsspec URLs (s3://bucket/runs/*). Without one: ./runs.
Every run is read as `gpt-train status` reads it (gpt_train/status.py); its owner, from the newest start event
(gpt_train/owner.py), adds what the records alone cannot say: whether SLURM still holds the job (one squeue call,
and one sacct call for the jobs it has forgotten, for all the runs), whether a local launcher still lives.

    state                          when
    queued                         SLURM holds the job pending and no attempt has started yet
    running                        an attempt trains, or the owner restarts one after a crash (cause: why)
    preempted and waiting          the last attempt stopped (preempted, time limit, or requeued after failures)
                                   and the job waits in the queue, or a local run waits to be started again
    finished                       the final checkpoint verifies
    failed                         a crash, a hang or a divergence that nothing restarts; a SLURM job that ended
    stopped by the restart policy  the same failure again and again (a gave_up event)
    stopped (cancelled)            `gpt-train cancel` stopped it (a cancelled event), or scancel did
    stopped                        it finished, but not as the config says now (status says why)
    not started                    no attempt has started (only refusals, or nothing)
    unreadable                     the run directory could not be read (detail says why)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from gpt_train import owner, rundir
from gpt_train.errors import StorageError, UserError
from gpt_train.recovery import ENDS, REFUSALS, STARTS
from gpt_train.status import RunRecords, format_duration, read_run, restart_cause, summarize
from gpt_train.storage import Store

CANCELLED = "cancelled"  # the event `gpt-train cancel` appends once the run has stopped (gpt_train/cancel.py)
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
KEYS = ("name", "run", "id", "state", "cause", "detail", "launcher", "slurm_job", "slurm_state", "step", "max_steps",
        "train_loss", "val_loss", "tokens_per_s", "eta_s", "checkpoint_step", "checkpoint_age_s", "attempts",
        "restarts", "restart_causes", "hosts")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="ROOT_OR_RUN", default=["runs"],
                        help="run directories, or folders holding them (one or two levels down); globs and fsspec "
                             "URLs work (default: runs)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects (stable keys)")
    parser.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 10) until Ctrl-C; put it after the paths, or --watch=5")


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        raise UserError(f"--watch needs a positive number of seconds, not {args.watch:g}")
    tty = sys.stdout.isatty()
    try:
        for refresh in itertools.count():
            rows = table(discover(args.paths))  # again at each refresh: --watch shows runs started since
            if args.json:
                text = json.dumps(rows, indent=None if args.watch else 2)  # --watch: one line per refresh
            else:
                text = format_table(rows) if rows else f"no runs under {', '.join(args.paths)}"
            if args.watch and not args.json:
                head = f"gpt-train runs: {len(rows)} run(s) at {time.strftime('%H:%M:%S')}, every {args.watch:g}s"
                text = (CLEAR if tty else "\n" if refresh else "") + f"{head} (Ctrl-C to stop)\n{text}"
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # the way out of --watch, not a failure
        pass
    return 0


# -- finding the runs ----------------------------------------------------------------------------------------

def _expand(arg: str) -> list[str]:
    """A glob's matches as URLs (fsspec strips the protocol from what it returns), or the argument itself."""
    if not any(c in arg for c in "*?["):
        return [arg]
    store = Store(arg)
    return [m if store.local else store.fs.unstrip_protocol(m) for m in sorted(store.fs.glob(store.root))]


def _entries(url: str) -> tuple[set[str], list[str]]:
    """(the names under url, the names of its subfolders); nothing when it does not exist."""
    store = Store(url)
    try:
        found = store.fs.ls(store.root, detail=True)
    except FileNotFoundError:
        return set(), []
    except Exception as e:
        raise StorageError(f"cannot list '{url}': {type(e).__name__}: {e}") from None
    names, folders = set(), []
    for entry in found:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        names.add(name)
        if entry.get("type") == "directory" and not name.startswith("."):
            folders.append(name)
    return names, sorted(folders)


def _is_run(names: set[str]) -> bool:
    return bool(names & {rundir.EVENTS, rundir.CHECKPOINTS})


def discover(args: list[str]) -> list[tuple[str, str]]:
    """(name, url) of each run directory the arguments name or hold, in the order given, each once. A run found
    under a folder is named by its path below that folder."""
    out: dict[str, str] = {}
    for arg in args:
        matches = _expand(arg)
        if not matches:
            raise UserError(f"no file or folder matches '{arg}'")
        for url in (m.rstrip("/") for m in matches):
            names, folders = _entries(url)
            if not names and not Store(url).exists():
                raise UserError(f"no run or folder at '{url}'")
            if _is_run(names):
                out.setdefault(url, url.rsplit("/", 1)[-1] or url)
                continue
            for child in folders:
                child_names, grandchildren = _entries(f"{url}/{child}")
                if _is_run(child_names):
                    out.setdefault(f"{url}/{child}", child)
                    continue
                for grandchild in grandchildren:
                    if _is_run(_entries(f"{url}/{child}/{grandchild}")[0]):
                        out.setdefault(f"{url}/{child}/{grandchild}", f"{child}/{grandchild}")
    return [(name, url) for url, name in out.items()]


# -- one line per run ----------------------------------------------------------------------------------------

def _read(url: str) -> RunRecords | str:
    try:
        return read_run(url, verify=False)  # many runs, every refresh: the meta only
    except Exception as e:  # one unreadable run must not hide the others: its line says why
        return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def table(found: list[tuple[str, str]], now: float | None = None) -> list[dict]:
    """The rows of the runs found, read in parallel (each read lists, reads and verifies files: on an object store
    that is round trips, not CPU)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(found)))) as pool:
        read = list(pool.map(_read, [url for _, url in found]))
    owners = [owner.of(e) for info in read if isinstance(info, RunRecords) and (e := owner_event(info.events))]
    states = owner.slurm_states([o.slurm_job for o in owners if o.launcher == "slurm" and o.slurm_job])
    now = time.time() if now is None else now
    return [row(name, info, states, now) if isinstance(info, RunRecords) else unreadable(name, url, info)
            for (name, url), info in zip(found, read)]


def newest_start(events: list[dict]) -> dict | None:
    return next((e for e in reversed(events) if e.get("event") in STARTS), None)


def owner_event(events: list[dict]) -> dict | None:
    """The event that names who runs the run now: the newest start, or a refusal after it that names a SLURM job (a
    start refused before any attempt: the job still holds the run, pending again)."""
    return next((e for e in reversed(events) if e.get("event") in STARTS
                 or (e.get("event") in REFUSALS and e.get("slurm_job"))), None)


def after_newest_start(events: list[dict]) -> list[dict]:
    """The events since the newest start (all of them when there is none)."""
    i = max((i for i, e in enumerate(events) if e.get("event") in STARTS), default=-1)
    return events[i + 1:]


def fleet_state(info: RunRecords, report: dict, job_state: str | None, live: bool | None,
                ) -> tuple[str, str | None, str]:
    """(state, a short cause or None, a sentence): see the module docstring. job_state: the SLURM job's state,
    None outside SLURM or when SLURM does not know the job; live: owner.alive()."""
    last = info.attempts[-1] if info.attempts else None
    since = after_newest_start(info.events)
    cancel = next((e for e in reversed(since) if e.get("event") == CANCELLED), None)
    refusal = next((e for e in reversed(since) if e.get("event") in REFUSALS), None)
    at = f" at step {last.last_step}" if last else ""
    if cancel is not None:
        return "stopped (cancelled)", None, f"cancelled by {cancel.get('by', '?')} at step {cancel.get('step')}"
    if report["finished"]:
        return "finished", None, f"finished at step {report['step']:,}"
    if refusal is not None and refusal["event"] == "gave_up":
        return "stopped by the restart policy", None, refusal.get("cause", "")
    ended = "" if last is None or last.end is None else f"{ENDS[last.end]}{at}: {last.end_cause}"
    if job_state is not None and job_state not in owner.TERMINAL:
        if job_state in RUNNING_STATES:
            if last is None or last.end is None:
                return "running", None, f"SLURM job {job_state}" + ("" if last else ", starting")
            return "running", "restarting", f"SLURM job {job_state}, between attempts: the last one {ended}"
        if last is None:
            return "queued", None, f"SLURM job {job_state}" + (f": {refusal.get('cause')}" if refusal else "")
        cause, why = _waiting(last, refusal)
        return "preempted and waiting", cause, f"SLURM job {job_state}; {why}"
    if job_state is not None:  # SLURM ended the job: nothing will start the run again
        if job_state == "CANCELLED" and (last is None or last.end in (None, "preempted")):
            return "stopped (cancelled)", None, f"SLURM job CANCELLED (scancel){at}"
        return "failed", job_state.lower(), f"SLURM job {job_state}" + (f"; the last attempt {ended}" if ended else "")
    if last is None:
        return "not started", None, refusal.get("cause", "") if refusal else "no attempt has started"
    if last.end is None:
        if live is False:
            return "failed", "no final record", "its launcher is gone, and the last attempt wrote no end record"
        if live or report["state"].startswith("running"):
            return "running", None, report["state"]
        return "failed", "no final record", report["state"]
    if refusal is not None or last.end == "preempted":
        cause, why = _waiting(last, refusal)
        return "preempted and waiting", cause, why
    if last.end == "finish":
        return "stopped", None, report["state"]
    if live:  # a local launcher starts the ranks again after a crash or a hang
        return "running", "restarting", f"the launcher restarts the last attempt, which {ended}"
    return "failed", last.end, ended


def _waiting(last, refusal: dict | None) -> tuple[str, str]:
    """(cause, sentence) of a run that waits to be started again."""
    if refusal is not None:
        return refusal["event"], f"{ENDS[refusal['event']]}: {refusal.get('cause', '')}"
    cause, detail = restart_cause(last)
    return cause, f"{cause}" + (f" ({detail})" if detail else "") + f" at step {last.last_step}"


def row(name: str, info: RunRecords, states: dict[str, str], now: float) -> dict:
    report = summarize(info, now=now)
    start, named = newest_start(info.events), owner_event(info.events)
    own = owner.of(named) if named else None
    job = own.slurm_job if own and own.launcher == "slurm" else None
    job_state = states.get(job) if job else None
    live = owner.alive(own, states) if own else None
    state, cause, detail = fleet_state(info, report, job_state, live)
    ckpt = report["checkpoint"]
    saved = ckpt.get("time") if ckpt else None
    return {
        "name": name, "run": info.url, "id": info.run_id, "state": state, "cause": cause, "detail": detail,
        "launcher": own.launcher if own else None, "slurm_job": job, "slurm_state": job_state,
        "step": report["step"], "max_steps": report["max_steps"],
        "train_loss": (report["train_loss"] or {}).get("value"), "val_loss": (report["val_loss"] or {}).get("value"),
        "tokens_per_s": report["tokens_per_s"], "eta_s": report["remaining_s"] if state == "running" else None,
        "checkpoint_step": ckpt["step"] if ckpt else None,
        "checkpoint_age_s": max(0.0, now - saved) if isinstance(saved, (int, float)) else None,
        "attempts": report["attempts"], "restarts": len(report["restarts"]),
        "restart_causes": [r["cause"] for r in report["restarts"]],
        "hosts": list((start or {}).get("hosts") or []),
    }


def unreadable(name: str, url: str, why: str) -> dict:
    return {**dict.fromkeys(KEYS), "name": name, "run": url, "state": "unreadable", "detail": why,
            "attempts": 0, "restarts": 0, "restart_causes": [], "hosts": []}


# -- text ------------------------------------------------------------------------------------------------------

def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v < 1e3 else f"{v / 1e3:.1f}k" if v < 1e5 else f"{v / 1e3:.0f}k" if v < 1e6 else \
        f"{v / 1e6:.2f}M"


def _restarts(r: dict) -> str:
    if not r["restarts"]:
        return "0"
    counts = Counter(r["restart_causes"])  # in the order each cause first came
    return f"{r['restarts']}: " + ", ".join(c + (f" x{counts[c]}" if counts[c] > 1 else "") for c in counts)


def _nodes(hosts: list[str]) -> str:
    return ",".join(hosts) if len(hosts) <= 2 else f"{hosts[0]},+{len(hosts) - 1}"


COLUMNS = (
    ("RUN", lambda r: r["name"]),
    ("STATE", lambda r: r["state"] + (f" ({r['cause']})" if r["cause"] else "")),
    ("JOB", lambda r: f"{r['slurm_job']} {r['slurm_state'] or '?'}" if r["slurm_job"] else "-"),
    ("STEP", lambda r: "-" if r["step"] is None else f"{r['step']:,}"
     + (f"/{r['max_steps']:,}" if r["max_steps"] else "")),
    ("LOSS", lambda r: "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"),
    ("VAL", lambda r: "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"),
    ("TOK/S", lambda r: _rate(r["tokens_per_s"])),
    ("ETA", lambda r: format_duration(r["eta_s"])),
    ("CKPT AGE", lambda r: format_duration(r["checkpoint_age_s"])),
    ("RESTARTS", _restarts),
    ("NODES", lambda r: _nodes(r["hosts"]) or "-"),
)


def format_table(rows: list[dict]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[fn(r) for _, fn in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines += [f"  {r['name']}: {r['detail']}" for r in rows if r["state"] == "unreadable"]
    return "\n".join(lines)
