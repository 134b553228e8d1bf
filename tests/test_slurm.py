"""slurm/pretrain.sbatch and launch/submit.py against the real test clusters (docs/testing.md): a tiny CPU run
completes; preempted (a higher-priority job, `scontrol requeue`, `scancel -b -s USR2`) and time-limited runs
checkpoint, requeue, resume and complete with the losses of an uninterrupted run, no step lost or counted
twice; two nodes in network namespaces, through sbatch and through submit.py.

Requeued jobs are released at once with `scontrol update StartTime=now` instead of waiting out cred_expire.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_train import protocol
from helpers import REPO, TINY, cli, losses, read_metrics, tiny_data, train_args  # noqa: F401

pytestmark = pytest.mark.slurm

MAX_STEPS = 40
STEPS = [f"max_steps={MAX_STEPS}", "checkpoint.interval=5"]  # stops land between checkpoints
PROMPT = "train.sample_prompt=It's \"quoted\" $HOME `id` ; x"  # must reach the job as typed
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
STEP_LINE = re.compile(r"^step +\d+/\d+ \| loss", re.M)


# -- helpers ---------------------------------------------------------------------------------------------------

def job_env(cluster, **extra: str) -> dict[str, str]:
    """The environment sbatch exports to the job: the repo's python, one thread per rank."""
    env = {**cluster.env, "GPT_TRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **extra}
    env.pop("GPT_TRAIN_DEADLINE", None)
    return env


def sbatch(cluster, *args: str, env: dict | None = None, wrap: str | None = None) -> str:
    argv = ["sbatch", "--parsable", *args] + (["--wrap", wrap] if wrap else [])
    p = subprocess.run(argv, capture_output=True, text=True, env=env or cluster.env, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_args(data: str, run_dir: Path, *extra: str) -> list[str]:
    return train_args(data, str(run_dir), *STEPS, *extra)[1:]  # without the "train" command


def starts(text: str) -> list[str]:
    """The output of each start of the job (the sbatch script and the submitit setup both print the marker)."""
    return re.split(r"^gpt-train: job \d+ start \d+ ", text, flags=re.M)[1:]


def wait_progress(path: Path, start: int, steps: int = 2, timeout: float = 180) -> None:
    """Until the job's START-th run (1-based) has logged STEPS training steps."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        runs = starts(text)
        if len(runs) >= start and len(STEP_LINE.findall(runs[start - 1])) >= steps:
            return
        time.sleep(0.2)
    raise TimeoutError(f"run {start} of the job did not log {steps} steps in {timeout}s:\n{text[-3000:]}")


def preempt_by_urgent_job(cluster, job: str, jobs: list[str]) -> None:
    """Real preemption: a job in the higher-priority partition takes the CPUs, SLURM requeues JOB (SIGTERM to its
    ranks only), and JOB starts again once the urgent one is done."""
    jobs.append(sbatch(cluster, "-p", "urgent", "--exclusive", "-J", "gt-urgent", "-o", os.devnull, wrap="sleep 1"))
    release(cluster, job)


def release(cluster, job: str, timeout: float = 120) -> None:
    """Wait until the stopped job is back in the queue, then start it without waiting out the cred_expire hold.
    Not at once: slurmd revokes the old run's credential with a time in whole seconds, and a new one created in
    that same second is refused ("Killing non-startable batch JobId=N: Job credential revoked"), which ends the
    job FAILED. Two seconds later is safe."""
    cluster.wait_state(job, "PENDING", timeout=timeout)
    time.sleep(2)
    deadline = time.monotonic() + timeout
    while cluster.state(job) == "PENDING":
        cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} still pending after {timeout}s")
        time.sleep(1)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def check_resumed_exactly(run_dir: Path, reference: dict[int, float], causes: list[set[str]]) -> list[dict]:
    """Each stop checkpointed and the next start resumed from that very step; every step was logged once;
    the losses are the uninterrupted run's."""
    ev = events(run_dir)
    stops = [e for e in ev if e["event"] == "preempted"]
    resumes = [e for e in ev if e["event"] == "resume"]
    assert len(stops) == len(causes), ev
    for stop, allowed in zip(stops, causes):
        assert stop["cause"] in allowed and stop["checkpoint_landed"], stop
        assert 0 < stop["step"] < MAX_STEPS, stop
    assert [r["step"] for r in resumes] == [s["step"] for s in stops], ev  # nothing lost, nothing run twice
    assert [e["event"] for e in ev].count("start") == 1 and ev[-1]["event"] == "finish" and ev[-1]["step"] == MAX_STEPS
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    meta = json.loads((run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "meta.json").read_text())
    assert meta["step"] == MAX_STEPS and meta["tokens"] == MAX_STEPS * 256
    assert losses(run_dir) == reference
    return stops


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test started; cancelled at its end (not the whole queue: the cluster may be shared)."""
    ids: list[str] = []
    yield ids
    if ids:
        slurm_cluster.run("scancel", *ids, check=False)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[int, float]:
    """Losses of the same run, uninterrupted, as one local process."""
    run = tmp_path_factory.mktemp("reference") / "run"
    p = cli(*train_args(tiny_data, str(run), *STEPS, PROMPT), env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return losses(run)


# -- slurm/pretrain.sbatch --------------------------------------------------------------------------------------

SBATCH_CPU = ["-p", "debug", "--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "-t", "10"]


def test_sbatch_tiny_cpu_run_completes_and_a_requeue_after_it_exits_at_once(slurm_cluster, tiny_data, tmp_path,
                                                                            reference, jobs):
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm_cluster, *SBATCH_CPU, "-J", "gt-sbatch", "-o", str(out), "slurm/pretrain.sbatch",
                 *job_args(tiny_data, run, PROMPT), env=job_env(slurm_cluster))
    jobs.append(job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "world: 1 rank(s)" in text and f"done: step {MAX_STEPS}" in text
    assert "sample_prompt: It's \"quoted\" $HOME `id` ; x" in (run / "config.yaml").read_text()
    assert losses(run) == reference
    assert re.search(r"^deadline: ", text, re.M)  # the batch shell found the job's end time

    # A requeue after the run finished: the job runs again and exits at once with success.
    slurm_cluster.run("scontrol", "requeue", job)
    release(slurm_cluster, job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=120) == "COMPLETED"
    again = starts(out.read_text())
    assert len(again) == 2 and f"run already complete at step {MAX_STEPS}/{MAX_STEPS}" in again[1]
    assert not STEP_LINE.search(again[1])
    history = slurm_cluster.history(job)
    assert len(history) == 2 and history[-1] == "COMPLETED", history


def test_sbatch_preempted_three_ways_resumes_exactly(slurm_cluster, tiny_data, tmp_path, reference, jobs):
    """Stopped by a job in the higher-priority partition (SIGTERM to the ranks only), by `scontrol requeue`
    (SIGTERM to everything) and by USR2 to the batch shell (what --signal=B:USR2 does before the time limit)."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm_cluster, *SBATCH_CPU, "-J", "gt-preempted", "-o", str(out), "slurm/pretrain.sbatch",
                 *job_args(tiny_data, run, PROMPT), env=job_env(slurm_cluster))
    jobs.append(job)
    wait_progress(out, 1)
    preempt_by_urgent_job(slurm_cluster, job, jobs)
    wait_progress(out, 2)
    slurm_cluster.run("scontrol", "requeue", job)
    release(slurm_cluster, job)
    wait_progress(out, 3)
    slurm_cluster.run("scancel", "-b", "-s", "USR2", job)
    release(slurm_cluster, job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED", out.read_text()[-3000:]

    check_resumed_exactly(run, reference, [{"SIGTERM"}, {"SIGTERM"}, {"SIGUSR2"}])
    runs = starts(out.read_text())
    assert len(runs) == 4
    assert "the ranks checkpointed and exited 75: requeueing job" in runs[0]  # preemption: this shell requeues
    assert "batch shell got SIGTERM" in runs[1] and "requeueing" not in runs[1]  # scontrol requeue: SLURM does
    assert "USR2 (time limit near): passing it to the ranks" in runs[2] and "requeueing job" in runs[2]
    history = slurm_cluster.history(job)
    assert len(history) == 4 and history[-1] == "COMPLETED", history


# -- launch/submit.py (submitit) ---------------------------------------------------------------------------------

def submit_py(cluster, tiny_data, run: Path, logs: Path, *options: str, overrides: tuple = (), timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "launch" / "submit.py"), "--backend", "slurm", "--cpu", "-t", "10",
            "--log-dir", str(logs), *options, *job_args(tiny_data, run, *overrides)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or job_env(cluster))


def submitted(p: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job = re.search(r"^submitted job (\d+)$", p.stdout, re.M).group(1)
    log = Path(re.search(r"^log \(rank 0\): (.+)$", p.stdout, re.M).group(1))
    return job, log


TWO_RANKS = ["--nodes", "1", "--gpus", "2", "-p", "debug"]


@pytest.fixture(scope="module")
def two_ranks(slurm_cluster, tiny_data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """An uninterrupted 2-rank submitit job, followed to its end (--follow)."""
    base = tmp_path_factory.mktemp("submit")
    run = base / "run"
    p = submit_py(slurm_cluster, tiny_data, run, base / "logs", *TWO_RANKS, "--follow")
    return p, run


def test_submit_two_cpu_ranks_completes(two_ranks, slurm_cluster, reference):
    p, run = two_ranks
    job, log = submitted(p)
    assert f"gpt-train-submit: job {job} ended COMPLETED" in p.stdout, p.stdout[-3000:]
    assert "world: 2 rank(s) on 1 node(s)" in p.stdout and f"done: step {MAX_STEPS}" in p.stdout  # --follow streamed
    assert log.name == f"{job}_0_log.out" and (log.parent / f"{job}_1_log.out").exists()
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1))
    two, one = losses(run), reference  # 2 ranks x 4 sequences = 1 rank x 8 sequences, up to float rounding
    assert two.keys() == one.keys() and all(abs(two[s] - one[s]) < 1e-3 for s in one)


def test_submit_forced_preemption_and_usr2_requeue_and_resume(two_ranks, slurm_cluster, tiny_data, tmp_path, jobs):
    """Preempted by a job in the higher-priority partition (SIGTERM to the ranks), then USR2 to the ranks (what
    SLURM's --signal=USR2@N does before the time limit). Rank 0 records a signal that reached only the other
    rank first as "peer"."""
    run = tmp_path / "run"
    job, log = submitted(submit_py(slurm_cluster, tiny_data, run, tmp_path / "logs", *TWO_RANKS))
    jobs.append(job)
    wait_progress(log, 1)
    preempt_by_urgent_job(slurm_cluster, job, jobs)
    wait_progress(log, 2)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    release(slurm_cluster, job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED", log.read_text()[-3000:]
    check_resumed_exactly(run, losses(two_ranks[1]), [{"SIGTERM", "peer"}, {"SIGUSR2", "peer"}])
    runs = starts(log.read_text())
    assert len(runs) == 3 and all("the ranks checkpointed and exited 75: requeueing job" in r for r in runs[:2])


def test_submit_time_limit_requeues_and_resumes(two_ranks, slurm_cluster, tiny_data, tmp_path, jobs):
    """A 1-minute job whose trainer stops 57 s before the limit (the end time the batch shell read from squeue),
    that is after its first step or a few more: the whole run takes less than a minute here; once requeued, its
    limit is raised so that the second run can finish. (SLURM's own USR2 is asked for 5 s before the limit: it may
    come tens of seconds early, and must not hit the ranks while they start.)"""
    run = tmp_path / "run"
    p = submit_py(slurm_cluster, tiny_data, run, tmp_path / "logs", *TWO_RANKS, "-t", "1", "--signal-delay", "5",
                  overrides=("preemption.deadline_margin_s=57",))
    job, log = submitted(p)
    jobs.append(job)
    assert "#SBATCH --signal=USR2@5" in (log.parent / f"{job}_submission.sh").read_text()
    wait_progress(log, 1, steps=1)
    slurm_cluster.wait_state(job, "PENDING", timeout=120)  # requeued by its own batch shell
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "TimeLimit=10")
    release(slurm_cluster, job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED", log.read_text()[-3000:]
    # "peer": rank 1 reached its deadline a step before rank 0 (each rank times its own steps)
    check_resumed_exactly(run, losses(two_ranks[1]), [{"deadline", "SIGUSR2", "peer"}])
    first = starts(log.read_text())[0]
    assert re.search(r"^preemption: (deadline|a peer rank was signalled|SIGUSR2) at step", first, re.M), first
    assert "the ranks checkpointed and exited 75: requeueing job" in first


# -- two nodes (network namespaces) ------------------------------------------------------------------------------

@pytest.mark.netns
def test_two_nodes_through_sbatch_and_submit(slurm2_cluster, tiny_data, tmp_path):
    env = job_env(slurm2_cluster, GLOO_SOCKET_IFNAME="eth0")
    short = ["max_steps=6"]
    run, out = tmp_path / "sbatch-run", tmp_path / "sbatch.out"
    job = sbatch(slurm2_cluster, "-p", "multi", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                 "--cpus-per-task=1", "-t", "10", "-o", str(out), "slurm/pretrain.sbatch",
                 *job_args(tiny_data, run, *short), env=env)
    try:
        assert slurm2_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED", out.read_text()[-3000:]
    finally:
        slurm2_cluster.run("scancel", job, check=False)
    text = out.read_text()
    assert "2 rank(s) on 2 node(s)" in text and re.search(r"master n1:\d+", text), text[-3000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "submit-run"
    p = submit_py(slurm2_cluster, tiny_data, run, tmp_path / "logs", "--nodes", "2", "--gpus", "1", "-p", "multi",
                  "--socket-ifname", "eth0", "--follow", overrides=short, env=job_env(slurm2_cluster))
    job, log = submitted(p)
    assert f"job {job} ended COMPLETED" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 rank(s) on 2 node(s)" in p.stdout and "export GLOO_SOCKET_IFNAME=eth0" in (
        log.parent / f"{job}_submission.sh").read_text()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# -- failures: restarts inside the allocation, the restart policy, nodes left behind ------------------------------

SBATCH_TWO = ["-p", "debug", "--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "-t", "10"]


def starts_in(run: Path) -> list[dict]:
    return [e for e in events(run) if e["event"] in ("start", "resume")]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_sbatch_a_crashed_or_hung_rank_is_restarted_in_the_allocation_and_the_run_finishes_exactly(
        slurm_cluster, tiny_data, tmp_path, two_ranks, jobs, fault):
    """raise or hang at step 6 on rank 1, once: the batch shell starts a new srun in the same allocation (no
    requeue), the ranks resume from the checkpoint of step 5, and the losses are the uninterrupted 2-rank run's.
    A hang is seen by the watchdog (fault.hang_timeout_s=5): both ranks leave their stacks. For the crash the
    timeout is long: rank 0 waits in a collective until the crashed rank's connections close, and on a loaded
    machine that took longer than 5 s once (CI), which the watchdog rightly called a hang."""
    _, reference_run = two_ranks
    run, out = tmp_path / "run", tmp_path / "job.out"
    env = job_env(slurm_cluster, GPT_TRAIN_FAULT=f"{fault}@step=6,rank=1,attempt=1")
    timeout = {"raise": 120, "hang": 5}[fault]
    job = sbatch(slurm_cluster, *SBATCH_TWO, "-J", f"gt-{fault}", "-o", str(out), "slurm/pretrain.sbatch",
                 *job_args(tiny_data, run, f"fault.hang_timeout_s={timeout}"), env=env)
    jobs.append(job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=600) == "COMPLETED", out.read_text()[-4000:]
    text = out.read_text()
    said = {"raise": "the ranks crashed (exit 1)", "hang": "the ranks hung (exit 76; stacks in RUN/diagnostics/)"}
    shell = "\n".join(line for line in text.splitlines() if line.startswith(("gpt-train:", "srun:", "fault:")))
    assert f"gpt-train: {said[fault]}: restart 1 in this allocation" in text, f"{shell}\n{events(run)}"
    assert len(starts(text)) == 1, "restarted inside the job, not requeued"
    kinds = [e["event"] for e in events(run)]
    assert kinds == ["start", {"raise": "crash", "hang": "hang"}[fault], "resume", "finish"], kinds
    assert events(run)[1]["step"] == 5, events(run)[1]
    if fault == "hang":
        dumps = sorted(p.name for p in (run / "diagnostics" / "attempt-1").glob("rank-*.txt"))
        assert dumps == ["rank-0.txt", "rank-1.txt"] and events(run)[1]["suspects"] == [1], events(run)[1]
    assert [s["allocation"] for s in starts_in(run)] == [f"slurm:{job}:0"] * 2
    assert losses(run) == losses(reference_run)


@pytest.mark.timeout(900)
def test_submit_a_killed_rank_is_restarted_and_the_same_crash_every_time_stops_the_job(
        slurm_cluster, tiny_data, tmp_path, two_ranks, jobs):
    _, reference_run = two_ranks
    run = tmp_path / "once"
    p = submit_py(slurm_cluster, tiny_data, run, tmp_path / "logs", *TWO_RANKS, "--follow", timeout=600,
                  env=job_env(slurm_cluster, GPT_TRAIN_FAULT="kill@step=6,rank=0,attempt=1"))
    job, log = submitted(p)
    jobs.append(job)
    assert f"job {job} ended COMPLETED" in p.stdout, p.stdout[-4000:]
    assert "the ranks crashed (exit" in p.stdout and "restart 1 in this allocation" in p.stdout, p.stdout[-4000:]
    ended = [e for e in events(run) if e["event"] == "crash"]
    assert len(ended) == 1 and ended[0]["recorded_by"] == "the next start", ended  # rank 0 could not say
    assert losses(run) == losses(reference_run)

    run = tmp_path / "always"
    p = submit_py(slurm_cluster, tiny_data, run, tmp_path / "logs2", *TWO_RANKS, overrides=("fault.in_job_restarts=5",),
                  env=job_env(slurm_cluster, GPT_TRAIN_FAULT="raise@step=3,rank=1"))
    job, log = submitted(p)
    jobs.append(job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=600) == "FAILED", log.read_text()[-4000:]
    final = events(run)[-1]
    assert final["event"] == "gave_up" and "3 attempts in a row failed at step 2" in final["cause"], final
    (row,) = slurm_cluster.sacct(job, "JobID,State,ExitCode")
    assert row["ExitCode"] == f"{protocol.EXIT_GAVE_UP}:0", row  # the policy's code, not a crash's


@pytest.mark.timeout(900)
def test_a_node_that_fails_its_start_up_check_is_left_behind_on_requeue(slurm2_cluster, tiny_data, tmp_path):
    """On the two-node cluster a one-node job whose first start fails the preflight on the node it got (the
    fault fires on attempt 1, wherever that runs) is requeued without that node: the second start runs on
    the other one, and ExcNodeList names the first."""
    run, out, report = tmp_path / "run", tmp_path / "job.out", tmp_path / "nodes"
    env = job_env(slurm2_cluster, GPT_TRAIN_FAULT="preflight@attempt=1", GPT_TRAIN_NODE_REPORT=str(report))
    job = sbatch(slurm2_cluster, "-p", "multi", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                 "--cpus-per-task=1", "-t", "10", "-o", str(out), "slurm/pretrain.sbatch",
                 *job_args(tiny_data, run, "max_steps=6"), env=env)
    try:
        release(slurm2_cluster, job, timeout=240)
        assert slurm2_cluster.wait_state(job, *TERMINAL, timeout=300) == "COMPLETED", out.read_text()[-4000:]
    finally:
        slurm2_cluster.run("scancel", job, check=False)
    text = out.read_text()
    (bad,) = [e for e in events(run) if e["event"] == "bad_node"]
    (first,) = bad["hosts"]
    other = {"n1": "n2", "n2": "n1"}[first]
    assert f"without node(s) {first}:" in text, text[-4000:]
    assert starts_in(run)[0]["hosts"] == [other], events(run)
    info = slurm2_cluster.run("scontrol", "show", "job", job).stdout
    assert f"ExcNodeList={first}" in info and f"NodeList={other}" in info, info
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
