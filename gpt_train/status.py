"""`gpt-train status RUN [--json]`: where a run stands, read from its own records only.

RUN is a local path or any fsspec URL. Nothing here needs the scheduler, wandb or a GPU: the
run directory's run.json, config.yaml, metrics.jsonl, events.jsonl and checkpoint metadata say
everything (on an object store, metrics are as of the last checkpoint: they are written whole then).

The checkpoint reported is the newest one that verifies, as a resume would find it: checkpoints are
verified from the newest down (every byte is read), the newer ones that fail are listed with the reason,
and the older ones are listed as not verified. A run is finished only when its final checkpoint verifies.

Restarts and their causes, from events.jsonl. Every start or resume after the first one is a
restart; what ended the attempt before it is its cause:

    previous attempt ended with          cause
    preempted, cause "deadline"          time limit   (the run stopped itself before the job's end time)
    preempted, SIGUSR2 under SLURM       time limit   (`--signal=USR2@...` before the time limit)
    preempted, any other signal          preempted    (SIGTERM from scancel/preemption, SIGUSR1, a peer rank)
    finish                               extended     (resumed after finishing, e.g. with a larger max_steps)
    hang                                 hang         (the watchdog saw no progress: RUN/diagnostics/)
    diverged                             diverged     (a non-finite loss with nothing left to skip)
    crash, or no record of how it ended  crash        (an exception, killed, out of memory, node failure)

A start that the restart policy or the start-up check refused (bad_node, requeue, gave_up events) is not an
attempt; the newest such refusal, when it came after the last attempt, is the run's state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import yaml

from gpt_train import rundir
from gpt_train.errors import StorageError, UserError
from gpt_train.recovery import ENDS, REFUSALS, Attempt, attempts
from gpt_train.runlog import read_identity, read_jsonl
from gpt_train.storage import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (local path or fsspec URL, e.g. s3://bucket/runs/x)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    info = read_run(args.run)
    report = summarize(info)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


# -- reading a run -----------------------------------------------------------------------------------

@dataclass
class RunRecords:
    url: str
    run_id: str | None
    config: dict
    metrics: list[dict]
    events: list[dict]
    checkpoints: list[int]  # steps of checkpoints with a manifest, oldest first
    newest_meta: dict | None  # meta.json of the newest checkpoint that verifies
    failed: list[tuple[int, str]] = field(default_factory=list)  # (step, why) of newer ones that do not, newest first
    unverified: list[int] = field(default_factory=list)  # older than the newest that verifies: not read
    rolled_back: list[int] = field(default_factory=list)  # steps of the folders under RUN/rolled-back
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1] or self.url

    def train(self) -> list[dict]:
        return [m for m in self.metrics if isinstance(m.get("loss"), (int, float))]

    def val(self) -> list[dict]:
        return [m for m in self.metrics if isinstance(m.get("val_loss"), (int, float))]

    def restarts(self) -> list[dict]:
        out = []
        for n, (before, after) in enumerate(zip(self.attempts, self.attempts[1:]), start=1):
            cause, detail = restart_cause(before)
            out.append({"n": n, "cause": cause, "detail": detail, "time": after.start_time,
                        "stopped_at_step": before.last_step, "resumed_at_step": after.start_step,
                        "slurm_job": after.slurm_job})
        return out


def read_run(url: str, verify: bool = True) -> RunRecords:
    """verify=False: the newest checkpoint's meta.json is taken as found, without reading every byte of the
    checkpoint (`gpt-train runs` reads many runs, again and again)."""
    store = Store(url)
    try:
        if not store.exists():
            raise UserError(f"no run at '{url}'")
        names = set(store.listdir())
    except StorageError as e:
        raise UserError(f"cannot read run '{url}': {e}") from None
    if not names & {rundir.EVENTS, rundir.METRICS, rundir.CHECKPOINTS, rundir.RUN}:
        raise UserError(f"'{url}' is not a run directory (no events.jsonl, metrics.jsonl or checkpoints/)")
    config = {}
    if rundir.CONFIG in names:
        try:
            config = yaml.safe_load(store.read_text(rundir.CONFIG)) or {}
        except (yaml.YAMLError, FileNotFoundError):
            config = {}
    steps = rundir.manifested_steps(store) if rundir.CHECKPOINTS in names else []
    newest, failed, unverified = None, [], []
    if steps and not verify:
        try:
            newest, unverified = rundir.read_meta(store, steps[-1]), steps[:-1]
        except Exception as e:  # a meta.json that does not read: judged as verify would
            failed.append((steps[-1], f"meta.json: {e}"))
    for i in range(len(steps) - 1, -1, -1) if verify else ():
        why = rundir.verify(store, steps[i])
        if why is None:
            newest, unverified = rundir.read_meta(store, steps[i]), steps[:i]
            break
        failed.append((steps[i], why))
    if not config and newest:
        config = newest.get("config", {})
    identity = read_identity(store)
    run_id = identity["id"] if identity else (newest or {}).get("run_id")
    records = RunRecords(url=store.url, run_id=run_id, config=config,
                         metrics=read_jsonl(store, rundir.METRICS), events=read_jsonl(store, rundir.EVENTS),
                         checkpoints=steps, newest_meta=newest, failed=failed, unverified=unverified,
                         rolled_back=rundir.list_rolled_back(store) if rundir.ROLLED_BACK in names else [])
    records.attempts = attempts(records.events, records.metrics)
    return records


def restart_cause(before: Attempt) -> tuple[str, str | None]:
    """(cause, detail) of the restart that followed the attempt `before`: see the module docstring."""
    if before.end == "preempted":
        detail = before.end_cause
        if detail == "deadline" or (detail == "SIGUSR2" and before.slurm_job):
            return "time limit", detail
        return "preempted", detail
    if before.end == "finish":
        return "extended", None
    if before.end in ("hang", "diverged"):
        return before.end, before.end_cause
    return "crash", before.end_cause


# -- the report ----------------------------------------------------------------------------------------

def summarize(info: RunRecords, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    train, val = info.train(), info.val()
    max_steps = (info.config.get("train") or {}).get("max_steps")
    step = max([m["step"] for m in info.metrics if isinstance(m.get("step"), int)] + info.checkpoints, default=0)
    tokens = max([m["tokens"] for m in info.metrics if isinstance(m.get("tokens"), int)], default=None)
    last = info.attempts[-1] if info.attempts else None
    newest = info.newest_meta
    resume_step = int(newest.get("step", 0)) if newest else None
    # The finish record is written even when the final checkpoint failed, and a checkpoint can rot later.
    final_ok = bool(last and resume_step is not None and resume_step >= (last.last_step or 0))
    finished = bool(last and last.end == "finish" and final_ok
                    and (max_steps is None or (last.last_step or 0) >= max_steps))

    recent = [m["step_ms"] for m in train[-20:] if isinstance(m.get("step_ms"), (int, float))]
    step_s = statistics.median(recent) / 1000 if recent else None
    elapsed = sum(max(0.0, (a.end_time or a.start_time) - a.start_time) for a in info.attempts)
    remaining = None
    if step_s and max_steps and not finished:
        remaining = max(0, max_steps - step) * step_s

    state = _state(info, now, finished, final_ok, resume_step, step_s)

    report = {
        "run": info.url,
        "id": info.run_id,
        "state": state,
        "finished": finished,
        "step": step,
        "max_steps": max_steps,
        "progress": (step / max_steps) if max_steps else None,
        "tokens": tokens,
        "checkpoint": None if newest is None else {
            "step": newest.get("step"), "url": f"{info.url}/{rundir.step_folder(int(newest.get('step', 0)))}",
            "val_loss": newest.get("val_loss"), "tokens": newest.get("tokens"), "final": newest.get("final", False),
            "time": newest.get("time"),
        },
        "failed_checkpoints": [{"step": s, "url": f"{info.url}/{rundir.step_folder(s)}", "reason": why}
                               for s, why in info.failed],
        "unverified_checkpoints": info.unverified,
        "rolled_back": [{"step": s, "url": f"{info.url}/{rundir.ROLLED_BACK}/{rundir.step_name(s)}"}
                        for s in info.rolled_back],
        "train_loss": None if not train else {"step": train[-1]["step"], "value": train[-1]["loss"]},
        "val_loss": None if not val else {"step": val[-1]["step"], "value": val[-1]["val_loss"]},
        "best_val_loss": min((m["val_loss"] for m in val), default=None),
        "val_bits_per_byte": val[-1].get("val_bpb") if val else None,
        "val_sources": val[-1].get("val_sources") if val else None,  # a mixture's, by folder
        "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
        "step_seconds": step_s,
        "mfu": train[-1].get("mfu") if train else None,
        "elapsed_s": elapsed,
        "wall_s": ((last.end_time or now) if finished else now) - info.attempts[0].start_time if info.attempts else 0.0,
        "remaining_s": remaining,
        "attempts": len(info.attempts),
        "restarts": info.restarts(),
    }
    return report


def _state(info: RunRecords, now: float, finished: bool, final_ok: bool, resume_step: int | None,
           step_s: float | None) -> str:
    """The run's state in words: not started, refused by the restart policy or cancelled, finished, ended how,
    or running (its records are recent)."""
    last = info.attempts[-1] if info.attempts else None
    refusal = next((e for e in reversed(info.events) if e.get("event") in REFUSALS + ("cancelled",)
                    and float(e.get("time", 0)) >= (last.start_time if last else 0)), None)
    if last is None and refusal is None:
        return "not started"
    if refusal is not None:
        return (f"stopped (cancelled by {refusal.get('by', '?')} at step {refusal.get('step')})"
                if refusal["event"] == "cancelled" else
                {"gave_up": "stopped by the restart policy", "bad_node": "waiting to be requeued without a bad node",
                 "requeue": "waiting to be requeued (in-job restarts spent)"}[refusal["event"]]
                + f": {refusal.get('cause', '')}")
    if finished:
        return "finished"
    if last.end == "finish" and not final_ok:
        return (f"ended at step {last.last_step}, but " + ("no checkpoint verifies: a resume starts fresh"
                if resume_step is None else f"the newest checkpoint that verifies is of step {resume_step}: "
                "a resume continues from there"))
    if last.end == "finish":
        return "finished (at a smaller max_steps than the config now says)"
    if last.end == "preempted":
        cause, _ = restart_cause(last)
        return f"stopped: {cause} ({last.end_cause}) at step {last.last_step}; waiting to be requeued or resumed"
    if last.end is not None:
        return f"{ENDS[last.end]} at step {last.last_step}: {last.end_cause}"
    idle = now - (last.end_time or last.start_time)
    # Quiet for longer than this: no longer running. On an object store metrics land only at checkpoints.
    quiet_ok = max(600.0, 20 * (step_s or 0))
    if not Store(info.url).local:
        quiet_ok = max(quiet_ok, 2 * ((info.config.get("checkpoint") or {}).get("interval") or 0) * (step_s or 0))
    return ("running" if idle <= quiet_ok else "stopped without a final record (crashed or killed)") \
        + f", last record {format_duration(idle)} ago"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {m:02d}m"
    days, h = divmod(hours, 24)
    return f"{days}d {h:02d}h"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_report(r: dict) -> str:
    lines = [f"run:        {r['run']}" + (f" (id {r['id']})" if r["id"] else "")]
    lines.append(f"state:      {r['state']}")
    of = f" / {r['max_steps']:,} ({r['progress']:.1%})" if r["max_steps"] else ""
    lines.append(f"step:       {r['step']:,}{of}" + (f", {r['tokens']:,} tokens" if r["tokens"] is not None else ""))
    c = r["checkpoint"]
    if c:
        extra = (f", val loss {c['val_loss']:.4f}" if c["val_loss"] is not None else "") + (", final" if c["final"] else "")
        lines.append(f"checkpoint: step {c['step']:,}{extra}  {c['url']}")
    else:
        lines.append("checkpoint: " + ("none that verifies" if r["failed_checkpoints"] else "none yet"))
    for x in r["failed_checkpoints"]:
        lines.append(f"  step {x['step']:,} does not verify: {x['reason']}")
    if r["unverified_checkpoints"]:
        lines.append("  not verified (older): " + ", ".join(f"step {s:,}" for s in r["unverified_checkpoints"]))
    if r["rolled_back"]:
        lines.append("rolled back: " + ", ".join(f"step {x['step']:,}" for x in r["rolled_back"])
                     + f"  (under {r['run']}/{rundir.ROLLED_BACK}/)")
    loss = []
    if r["train_loss"]:
        loss.append(f"train {r['train_loss']['value']:.4f} (step {r['train_loss']['step']:,})")
    if r["val_loss"]:
        bpb = f", {r['val_bits_per_byte']:.3f} bits/byte" if r["val_bits_per_byte"] is not None else ""
        loss.append(f"val {r['val_loss']['value']:.4f}{bpb} (step {r['val_loss']['step']:,}, best {r['best_val_loss']:.4f})")
    lines.append("loss:       " + (", ".join(loss) or "-"))
    for where, v in (r["val_sources"] or {}).items():
        bpb = f", {v['val_bpb']:.3f} bits/byte" if v.get("val_bpb") is not None else ""
        lines.append(f"  val {v['val_loss']:.4f}{bpb} on {where}")
    if r["tokens_per_s"] is not None:
        lines.append(f"speed:      {r['tokens_per_s']:,.0f} tokens/s, {r['step_seconds'] * 1000:,.0f} ms/step"
                     + (f", MFU {r['mfu']:.1%}" if r["mfu"] else ""))
    lines.append(f"elapsed:    {format_duration(r['elapsed_s'])} training in {r['attempts']} attempt(s), "
                 f"{format_duration(r['wall_s'])} since the first start")
    if not r["finished"]:
        lines.append("remaining:  " + (f"about {format_duration(r['remaining_s'])} at the recent speed"
                                       if r["remaining_s"] is not None else "unknown"))
    lines.append(f"restarts:   {len(r['restarts'])}")
    for x in r["restarts"]:
        detail = f" ({x['detail']})" if x["detail"] else ""
        job = f", SLURM job {x['slurm_job']}" if x["slurm_job"] else ""
        lines.append(f"  {x['n']}. {_when(x['time'])}  {x['cause']}{detail}: stopped at step {x['stopped_at_step']}, "
                     f"resumed from step {x['resumed_at_step']}{job}")
    lines.append(f"finished:   {'yes' if r['finished'] else 'no'}")
    return "\n".join(lines)
