"""Goodput of a real SLURM job under faults: the share of its wall time spent in steps that count.

One job on the test SLURM cluster (tests/infra/slurm_up.sh) runs slurm/pretrain.sbatch on one CPU rank with a
small preset of `default` (2 layers x 64 wide, 64 tokens, 1,024 tokens per step, a checkpoint every 10 steps,
logging every step, evaluation only at the end) on the first 200 kB of the bundled corpus, prepared here into a
temporary folder. While it trains:

* a preemption every --period seconds: a job in the `urgent` partition with --exclusive (as tests/test_slurm.py's
  preempt_by_urgent_job does) takes the node, SLURM sends the ranks SIGTERM, they checkpoint at the next step
  boundary and the batch shell requeues the job, which is then started at once (`scontrol update
  StartTime=now`, as the tests' release() does, instead of waiting out the cluster's cred_expire hold). A
  preemption is only announced to a job that is training (it has logged a step since its last start), after
  the planned crash and hang below (they are tied to the first and second start of the run, which a preemption
  before them would shift), and while no other job is on the cluster (it would be preempted too); the next one
  is due --period seconds after it. The script starts only on an empty queue.
* one crashed rank: GPT_TRAIN_FAULT raise@step=16,attempt=1 (the first start; 5 steps after the checkpoint of
  step 10), restarted by the batch shell inside the allocation;
* one hang: hang@step=26,attempt=2 (the start after the crash, 5 steps after the checkpoint of step 20), which
  the watchdog ends after fault.hang_timeout_s=10 s, restarted inside the allocation too.

GPT_TRAIN_PYTHON is a two-line wrapper that prints the time and then execs this venv's python, so that each
process start is on record in the job's output. Everything else is read from the run's own records afterwards:
RUN/events.jsonl (start/resume records, and what ended each start: preempted, crash, hang, finish, each with its
"time" and "step"), RUN/metrics.jsonl (the final history: one row per step with "time" and "step_ms"; the
trainer drops the rows of steps that a restart redoes) and the job's output file (the wrapper's lines and the
batch shell's "gpt-train: job J start K at DATE" line, whole seconds).

* wall time: from the sbatch call to the finish record.
* counted step time: the sum of step_ms over the final history; a step that was redone counts once. step_ms
  runs from the end of the previous step's report, so a checkpoint's blocked time is in the next step.
  goodput = counted step time / wall time.
* per start of the job, for the fault that ended the previous one (the first start: the submission):
    at              the fault: the urgent job's submission (preemption), the crash record (crash), the last
                    progress before the hang (the hang record's time less its silent_s)
    steps lost      steps computed but redone: the step of the end record less the step the next start resumed at
    redone s        from the end of the last step kept before the fault (the checkpoint resumed from) to the fault
    to stop s       fault -> the end record (a preemption: SLURM's signal, the step in progress and the next one,
                    the checkpoint written; a hang: the watchdog's timeout and the stack dumps)
    pending s       the end record -> the batch shell's start line (a preemption: the requeue, the urgent job,
                    the two seconds that release() waits, scheduling); whole seconds
    relaunch s      the end record -> the new process (pending included; an in-job restart: exit and a new srun;
                    also any process that ended before it wrote a start record, counted below the table); the
                    first start: sbatch -> the process
    start-up s      the new process -> its start/resume record (interpreter, imports, data, model, preflight,
                    the checkpoint found, verified and loaded)
    first step s    the start/resume record -> the first step's row (the first step, slower than the others)
    fault -> step s at -> the first step's row: to stop + relaunch + start-up + first step
    not counted s   the end of the last step kept before the fault -> the start of the next start's first step:
                    the wall time this fault took from the counted steps

Nothing here asserts a timing: the table says what this machine did once. The machine is likely shared (the
test suites use the same cluster and cores), so the script prints the load and the other jobs that ran.

    python benchmarks/goodput.py [--period 60] [--steps 1500] [--duration 900] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt_train import recovery  # torch-free: the reading of the events that `gpt-train status` uses
from gpt_train.prepare import bundled_corpus, prepare

REPO = Path(__file__).resolve().parent.parent

CONF = "/tmp/gpt-train-infra/slurm/etc/slurm.conf"  # where tests/infra/slurm_up.sh puts the cluster's config
INTERVAL = 10  # steps between checkpoints
# Halfway between checkpoints: what a failure at a random moment loses on average. Tied to the first two starts
# (the crash ends the first, the second resumes from step 10 and hangs), so that each fires exactly once.
CRASH_STEP, HANG_STEP = 16, 26
FAULTS = f"raise@step={CRASH_STEP},attempt=1;hang@step={HANG_STEP},attempt=2"
PLANNED = (("crash", 1), ("hang", 2))  # (the record that ends the start, the start)
PRESET = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "train.batch_tokens=1024",
          "train.micro_batch=16", "train.eval_interval=0", "train.log_interval=1", f"checkpoint.interval={INTERVAL}",
          "fault.hang_timeout_s=10"]
# tests/test_slurm.py's single CPU rank; the time limit is set from --duration
SBATCH_CPU = ["-p", "debug", "--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
LAST_STEPS = 15  # no preemption this close to the end: the run would finish before it stops
PROCESS_LINE = re.compile(r"^goodput: process start (\d+\.\d+)$", re.M)
SHELL_LINE = re.compile(r"^gpt-train: job \d+ start \d+ at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", re.M)


class Cluster:
    """The SLURM client commands, against SLURM_CONF (the test cluster's unless set)."""

    def __init__(self):
        path = os.environ.get("PATH", "/usr/bin:/bin")
        self.env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", CONF),
                    "PATH": path if "/usr/sbin" in path.split(":") else path + ":/usr/sbin"}

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def answers(self) -> bool:
        try:
            return self.run("sinfo", "-h", "-o", "%P").returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def sbatch(self, *args: str, env: dict | None = None, wrap: str | None = None) -> str:
        argv = ["sbatch", "--parsable", *args] + (["--wrap", wrap] if wrap else [])
        p = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, cwd=REPO, timeout=60)
        if p.returncode:
            sys.exit(f"sbatch failed: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def state(self, job: str) -> str | None:
        p = self.run("squeue", "-h", "-j", job, "-o", "%T")
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.split()[0]
        rows = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", job).stdout.splitlines()
        return rows[-1].split()[0] if rows else None  # "CANCELLED by 0" -> "CANCELLED"

    def wait_ended(self, job: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.state(job) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)

    def queue(self, besides: set[str] = frozenset()) -> list[str]:
        """The queued and running jobs, but those in `besides`."""
        lines = self.run("squeue", "-h", "-o", "%i %P %j %T").stdout.splitlines()
        return [line for line in lines if line.split()[0] not in besides]

    def release(self, job: str, timeout: float = 120) -> None:
        """Start the requeued (pending) job now, not after the cred_expire hold. Two seconds after it is
        back in the queue: slurmd revokes the old run's credential with a time in whole seconds, and a new one
        made in that same second is refused, which would end the job FAILED (tests/test_slurm.py's release)."""
        time.sleep(2)
        deadline = time.monotonic() + timeout
        while self.state(job) == "PENDING" and time.monotonic() < deadline:
            self.run("scontrol", "update", f"jobid={job}", "StartTime=now")
            time.sleep(1)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a file the job may be writing: a line it has not finished yet is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def prepared_data(root: Path) -> str:
    """The first 200 kB of the bundled corpus, prepared with the GPT-2 tokenizer (as tests/helpers.tiny_data)."""
    (root / "corpus.txt").write_text(Path(bundled_corpus()).read_text()[:200_000])
    with contextlib.redirect_stdout(io.StringIO()):
        prepare([str(root / "corpus.txt")], str(root / "prepared"), val_fraction=0.1)
    return str(root / "prepared")


def timed_python(root: Path) -> str:
    """GPT_TRAIN_PYTHON: the time of each process start into the job's output, then this venv's python (exec:
    the same process, so the signals and the exit code are the trainer's)."""
    path = root / "python"
    path.write_text(f'#!/bin/sh\necho "goodput: process start $(date +%s.%N)"\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def ready(run: Path, max_steps: int) -> bool:
    """Whether a preemption may be announced now: the job is training (it logged a step since its last start),
    the planned crash and hang are behind it (or can no longer happen), and it is not about to finish."""
    events = read_jsonl(run / "events.jsonl")
    starts = [e for e in events if e["event"] in recovery.STARTS]
    if not starts or events[-1]["event"] not in recovery.STARTS:
        return False
    kinds = {e["event"] for e in events}
    if any(kind not in kinds and len(starts) <= attempt for kind, attempt in PLANNED):
        return False
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "step_ms" in r and r["time"] > starts[-1]["time"]]
    return bool(rows) and rows[-1]["step"] < max_steps - LAST_STEPS


def run_job(cluster: Cluster, root: Path, args: argparse.Namespace) -> dict:
    """Submit the job, preempt it every --period seconds, start it again whenever it is requeued; until it
    ends or --duration has passed. Returns what the analysis needs that the records do not hold."""
    run, out = root / "run", root / "job.out"
    env = {**cluster.env, "GPT_TRAIN_PYTHON": timed_python(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "GPT_TRAIN_FAULT": FAULTS, "GPT_TRAIN_NODE_REPORT": str(root / "nodes"),
           # every preemption is a requeue, counted by SLURM_RESTART_COUNT
           "MAX_RESTARTS": str(int(args.duration / args.period) + 10)}
    env.pop("GPT_TRAIN_DEADLINE", None)
    # The trainer stops deadline_margin_s (180 s) before the time limit: the limit must lie beyond the benchmark.
    limit = math.ceil(args.duration / 60) + 5
    overrides = [f"data.dir={prepared_data(root)}", f"run_dir={run}", *PRESET, f"train.max_steps={args.steps}"]
    submitted = time.time()
    job = cluster.sbatch(*SBATCH_CPU, "-t", str(limit), "-J", "gt-goodput", "-o", str(out), "slurm/pretrain.sbatch",
                         "default", *overrides, env=env)
    urgent_jobs: list[str] = []
    preemptions: list[float] = []
    late: list[float] = []  # how long after it was due each preemption came
    next_due = submitted + args.period
    finished = False
    try:
        while time.time() < submitted + args.duration:
            state = cluster.state(job)
            if state in TERMINAL:
                finished = True
                break
            if state == "PENDING":
                cluster.release(job)
            # Not while someone else's job is on the cluster: the urgent job would preempt it too.
            elif state == "RUNNING" and time.time() >= next_due and ready(run, args.steps) \
                    and not cluster.queue(besides={job, *urgent_jobs}):
                preemptions.append(time.time())
                late.append(preemptions[-1] - next_due)
                urgent_jobs.append(cluster.sbatch("-p", "urgent", "--exclusive", "-J", "gt-goodput-urgent",
                                                  "-o", os.devnull, wrap="sleep 1"))
                next_due = preemptions[-1] + args.period
            time.sleep(0.5)
    finally:
        if not finished:
            cluster.run("scancel", job, *urgent_jobs)
            cluster.wait_ended(job)  # the ranks write their last records as they stop
    mine = {job, *urgent_jobs}
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(submitted))
    others = cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,JobName", "-S", since).stdout
    return {"job": job, "state": cluster.state(job), "submitted": submitted, "preemptions": preemptions,
            "late": late, "run": run, "out": out,
            "others": [line.replace("|", " ") for line in others.splitlines() if line.split("|")[0] not in mine]}


def analyse(job: dict) -> tuple[list[dict], dict]:
    """One row per start of the job (the fault before it, and where the time from it to the next counted step
    went), and the totals of the wall time."""
    run = job["run"]
    events = read_jsonl(run / "events.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    rows = {r["step"]: r for r in metrics if "step_ms" in r}  # the final history: one row per step
    text = job["out"].read_text() if job["out"].exists() else ""
    processes = [float(t) for t in PROCESS_LINE.findall(text)]
    shells = [time.mktime(time.strptime(t, "%Y-%m-%d %H:%M:%S")) for t in SHELL_LINE.findall(text)]
    ends = {(e["event"], e["time"]): e for e in events if e["event"] in recovery.ENDS}
    history = recovery.attempts(events, metrics)
    unmatched = list(job["preemptions"])

    starts = []
    for i, a in enumerate(history):
        until = history[i + 1].start_time if i + 1 < len(history) else math.inf
        kept = sorted((r for r in rows.values() if a.start_time <= r["time"] < until), key=lambda r: r["step"])
        row = {"start": i + 1, "resumed_at": a.start_step, "first_row": kept[0] if kept else None,
               "process": max((p for p in processes if p <= a.start_time), default=None), "start_time": a.start_time}
        if i == 0:
            row.update(kind="submission", at=job["submitted"], step=0, lost=None, end_time=job["submitted"],
                       kept_end=job["submitted"])
        else:
            before = history[i - 1]
            end = ends.get((before.end, before.end_time), {})
            at, kind = before.end_time, before.end
            if kind == "hang":
                at -= end.get("silent_s", 0)
            elif kind == "preempted":
                ours = [t for t in unmatched if before.start_time < t <= before.end_time]
                if ours:
                    at, kind = ours[-1], "preemption"
                    unmatched.remove(ours[-1])
                else:
                    kind = f"stop ({before.end_cause}), not ours"
            elif kind == "crash" and end.get("recorded_by"):
                kind = "crash (no record of its own)"
            # the step under way at the fault: a crash and a hang fire as the step after the recorded one begins
            step = (before.last_step or 0) + 1
            if before.end == "preempted":
                step = min((r["step"] for r in rows.values() if r["time"] > at), default=step)
            kept_end = rows[a.start_step]["time"] if a.start_step in rows else job["submitted"]
            # the batch shell's line is in whole seconds, and only a requeued job prints a new one
            pending = next((s - before.end_time for s in shells if s >= int(before.end_time)), None)
            row.update(kind=kind, at=at, step=step, lost=(before.last_step or 0) - a.start_step,
                       end_time=before.end_time, kept_end=kept_end,
                       redone=max(0.0, at - kept_end) if before.last_step != a.start_step else 0.0,
                       to_stop=before.end_time - at, pending=pending if before.end == "preempted" else None)
        # processes that ended before they could write a start record (an import error, a refused start)
        row["died"] = sum(1 for p in processes if row["end_time"] < p < (row["process"] or a.start_time))
        first = row["first_row"]
        row["relaunch"] = row["process"] - row["end_time"] if row["process"] else None
        row["startup"] = a.start_time - row["process"] if row["process"] else None
        row["first_step"] = first["time"] - a.start_time if first else None
        row["to_next"] = first["time"] - row["at"] if first else None
        row["uncounted"] = first["time"] - first["step_ms"] / 1000 - row["kept_end"] if first else None
        starts.append(row)

    finish = next((e for e in reversed(events) if e["event"] == "finish"), None)
    last = max(rows.values(), key=lambda r: r["step"]) if rows else None
    end_time = finish["time"] if finish else max([e["time"] for e in events] + [r["time"] for r in metrics])
    counted = sum(r["step_ms"] for r in rows.values()) / 1000
    totals = {"wall": end_time - job["submitted"], "counted": counted, "steps": len(rows),
              "tail": finish["time"] - last["time"] if finish and last else None, "finished": bool(finish),
              "median_ms": statistics.median(r["step_ms"] for r in rows.values()) if rows else None}
    return starts, totals


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return (f"{model}, {len(os.sched_getaffinity(0))} cores (nproc), torch {importlib.metadata.version('torch')}, "
            f"Python {sys.version.split()[0]}")


def report(job: dict, starts: list[dict], totals: dict, args: argparse.Namespace, load: tuple) -> None:
    wall = totals["wall"]
    print(f"job {job['job']}: {job['state']}" + ("" if totals["finished"] else
          " -- no finish record within --duration: the tables cover what the run recorded"))
    print(f"load average (1 min) {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"other jobs on the cluster meanwhile: {', '.join(job['others']) or 'none'}")
    print(f"steps that count: {totals['steps']}, median step {totals['median_ms']:.0f} ms\n")

    print("| start | after | at s | at step | steps lost | redone s | to stop s | pending s | relaunch s "
          "| start-up s | first step s | fault -> step s | not counted s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in starts:
        lost = "-" if r["lost"] is None else str(r["lost"])
        print(f"| {r['start']} (from step {r['resumed_at']}) | {r['kind']} | {r['at'] - job['submitted']:.1f} "
              f"| {r['step']} | {lost} | {seconds(r.get('redone'))} | {seconds(r.get('to_stop'))} "
              f"| {seconds(r.get('pending'))} | {seconds(r['relaunch'])} | {seconds(r['startup'])} "
              f"| {seconds(r['first_step'])} | {seconds(r['to_next'])} | {seconds(r['uncounted'])} |")

    for r in starts:
        if r["died"]:
            print(f"\nbefore start {r['start']}: {r['died']} process(es) ended before writing a start record (the "
                  "job's output says why); their time is in its relaunch")
    groups: dict[str, list[float]] = {}
    for r in starts:
        if r["uncounted"] is not None:
            groups.setdefault(r["kind"], []).append(r["uncounted"])
    print("\n| where the wall time went | s | share of wall |")
    print("|---|---|---|")
    print(f"| steps that count (sum of step_ms) | {totals['counted']:.1f} | **{totals['counted'] / wall:.1%}** |")
    accounted = totals["counted"]
    for kind, values in groups.items():
        what = "first start: submission -> first step" if kind == "submission" else \
            f"{len(values)} x {kind}: not counted"
        print(f"| {what} | {sum(values):.1f} | {sum(values) / wall:.1%} |")
        accounted += sum(values)
    if totals["tail"] is not None:
        print(f"| end: last step -> finish record (final eval, sample, checkpoint) | {totals['tail']:.1f} "
              f"| {totals['tail'] / wall:.1%} |")
        accounted += totals["tail"]
    other = round(wall - accounted, 1) + 0.0  # what the rows above miss: about 0, never -0.0
    print(f"| other (between steps, outside step_ms) | {other:.1f} | {other / wall:.1%} |")
    print(f"| wall: sbatch -> {'finish record' if totals['finished'] else 'last record'} | {wall:.1f} | 100% |")

    ours = [r for r in starts if r["kind"] == "preemption"]
    most = max((r["lost"] for r in ours), default=0)
    print(f"\ngoodput {totals['counted'] / wall:.1%} with a preemption every {args.period:g} s (target >= 80% at "
          f"60 s); {len(ours)} preemption(s)" + (f", at most {most} step(s) lost by one (target <= 1)" if ours else ""))
    if job["late"]:
        print(f"the preemptions came {statistics.mean(job['late']):.1f} s after they were due on average (at most "
              f"{max(job['late']):.1f} s): each waits for the job to train, for the planned crash and hang, and for "
              "other jobs to leave the cluster")
    missing = [kind for kind, _ in PLANNED if not any(r["kind"].startswith(kind) for r in starts)]
    if missing:
        print(f"planned but not seen: {', '.join(missing)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=float, default=60.0, help="seconds between preemptions (default 60)")
    # 1500 steps: about 6 minutes on a quiet 2-core machine, enough for six preemptions to outweigh the one
    # first start, crash and hang; a busy one runs into --duration and the tables cover what was recorded.
    parser.add_argument("--steps", type=int, default=1500, help="train.max_steps (default 1500)")
    parser.add_argument("--duration", type=float, default=900.0,
                        help="cancel the job after this many seconds if it has not finished (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory and the job's output")
    args = parser.parse_args()

    cluster = Cluster()
    if not cluster.answers():
        sys.exit(f"no SLURM cluster answers `sinfo` (SLURM_CONF={cluster.env['SLURM_CONF']}): bring the test "
                 f"cluster up with `bash tests/infra/slurm_up.sh`, then `export SLURM_CONF={CONF}`")
    busy = cluster.queue()
    if busy:
        # An urgent --exclusive job preempts every debug job on the node, and they would share its cores.
        sys.exit("the queue is not empty; the benchmark's preemptions would hit these jobs too, and they would "
                 "share the cores with it. Run it when the queue is empty:\n" + "\n".join(busy))

    root = Path(tempfile.mkdtemp(prefix="goodput-"))
    load = os.getloadavg()
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/goodput.py --period {args.period:g} --steps {args.steps} "
          f"--duration {args.duration:g}")
    print(f"job: sbatch {' '.join(SBATCH_CPU)} slurm/pretrain.sbatch default {' '.join(PRESET)} "
          f"train.max_steps={args.steps}; GPT_TRAIN_FAULT='{FAULTS}'")
    try:
        job = run_job(cluster, root, args)
        starts, totals = analyse(job)
        if not totals["steps"]:
            out = job["out"].read_text() if job["out"].exists() else ""
            sys.exit(f"job {job['job']} ({job['state']}) recorded no step; its output ends:\n{out[-3000:]}")
        report(job, starts, totals, args, load)
    finally:
        if args.keep:
            print(f"\nrun directory and job output kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
