"""gpt_train/protocol.py: torch-free, and the batch shell's requeue decision, one table run in real bash through
both job scripts that carry it (slurm/pretrain.sbatch and the one submitit writes), with stub SLURM commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from gpt_train import protocol
from helpers import REPO
from launch.slurm import Resources, script_text
from launch.spec import JobSpec

SBATCH = REPO / "slurm" / "pretrain.sbatch"
CAP = 3
RUNNING = "JobState=RUNNING Reason=None PreemptTime=None"
PREEMPTED = "JobState=RUNNING Reason=None PreemptTime=2026-11-22T01:16:11"
TIME_LIMIT = "JobState=COMPLETING Reason=TimeLimit PreemptTime=None"


def test_protocol_imports_no_torch():
    code = "import gpt_train.protocol, sys; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def functions(script: str) -> dict[str, str]:
    """The gpt_train_* shell functions a script defines, name -> definition."""
    return {m[1]: m[0] for m in re.finditer(r"^(gpt_train_\w+)\(\) \{\n.*?^\}$", script, re.M | re.S)}


def submitit_script(tmp_path) -> str:
    spec = JobSpec(config="default", config_path=str(REPO / "configs" / "default.yaml"), overrides=[],
                   run_dir=str(tmp_path / "run"), job_name="gt", ranks_per_node=2)
    return script_text(spec, Resources(gpus=False, max_restarts=CAP, log_dir=str(tmp_path / "logs")))


def test_both_job_scripts_carry_the_generated_text(tmp_path):
    text = SBATCH.read_text()
    assert protocol.synced(text) == text, "slurm/pretrain.sbatch is stale: run `python -m gpt_train.protocol sync`"
    generated = functions(protocol.shell_text())
    assert set(generated) == {"gpt_train_rendezvous", "gpt_train_traps", "gpt_train_launch", "gpt_train_requeue_why",
                              "gpt_train_exclusions", "gpt_train_requeue"}
    assert functions(text) == generated == functions(submitit_script(tmp_path))


def test_sync_rewrites_a_stale_block(tmp_path):
    stale = tmp_path / "job.sbatch"
    fresh = SBATCH.read_text()
    stale.write_text(fresh.replace("exited 75", "exited 76"))
    cmd = [sys.executable, "-m", "gpt_train.protocol", "sync", str(stale)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and "updated" in p.stdout and stale.read_text() == fresh, p.stdout + p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "up to date" in p.stdout


# -- the requeue decision ------------------------------------------------------------------------------------

class Row(NamedTuple):
    name: str
    rc: int  # srun's exit
    signal: str | None  # what the batch shell got while srun ran
    job: str  # what `scontrol show job` says
    restarts: int  # SLURM_RESTART_COUNT
    why: str | None  # the reason it gives for a requeue (None: it gives none)
    requeued: bool
    scripts: tuple[str, ...] = ("sbatch", "submitit")
    then: int | None = None  # srun's exit when it is run again (None: the same as the first time)
    runs: int = 1  # how many times the batch shell runs srun
    bad_nodes: str = ""  # the node report the ranks left ("HOST\twhy" lines)


USR2_LATE = "USR2 (time limit near) came before the ranks listened"
ROWS = [
    Row("success", 0, None, RUNNING, 0, None, False),
    # the trainer stopped at a USR2, its deadline, or a preemption's SIGTERM to the ranks only
    Row("checkpointed", 75, None, RUNNING, 0, "the ranks checkpointed and exited 75", True),
    Row("checkpointed-at-the-cap", 75, None, RUNNING, CAP, "the ranks checkpointed and exited 75", False),
    Row("scancel", 75, "TERM", "JobState=CANCELLED Reason=None PreemptTime=None", 0, None, False),
    Row("time-limit-checkpointed", 75, "TERM", TIME_LIMIT, 0, "the time limit came", True),
    Row("time-limit-killed", 143, "TERM", TIME_LIMIT, 0, None, False),
    Row("preempted-while-starting-143", 143, None, PREEMPTED, 0, "preempted (exit 143)", True),
    Row("preempted-while-starting-137", 137, None, PREEMPTED, 0, "preempted (exit 137)", True),
    # sbatch: --signal=B:USR2 reaches the batch shell, which passes it on; submitit has no such flag (below)
    Row("usr2-to-the-batch-shell", 1, "USR2", RUNNING, 0, f"{USR2_LATE} (exit 1)", True, ("sbatch",)),
    # submitit: --signal=USR2 reaches the ranks, which die of it before the trainer listens: 128 + SIGUSR2
    Row("usr2-killed-the-ranks", 140, None, RUNNING, 0, f"{USR2_LATE} (exit 140)", True),
    # in-job restarts: a new srun in the same allocation, with the previous exit code for the ranks
    Row("crash-restarted", 1, None, RUNNING, 0, None, False, then=0, runs=2),
    Row("killed-restarted", 137, None, RUNNING, 0, None, False, then=0, runs=2),
    Row("hang-restarted", 76, None, RUNNING, 0, None, False, then=0, runs=2),
    Row("hang-then-in-job-budget-spent", 76, None, RUNNING, 0, "the ranks checkpointed and exited 75", True,
        then=75, runs=2),
    Row("crash-every-time", 1, None, RUNNING, 0, None, False, runs=1 + protocol.MAX_IN_JOB),
    # never retried: a user error, the restart policy's verdict
    Row("user-error", 2, None, RUNNING, 0, None, False),
    Row("gave-up", 78, None, RUNNING, 0, None, False),
    # a node failed its start-up check: requeued without it (hold, ExcNodeList, release)
    Row("bad-node", 77, None, RUNNING, 0, "a node failed the start-up check (exit 77)", True,
        bad_nodes="node2\tinjected (GPT_TRAIN_FAULT)\n"),
    Row("bad-node-cannot-leave-the-only-nodes", 77, None, RUNNING, 0, "a node failed the start-up check (exit 77)",
        True, bad_nodes="node1\tx\nnode2\ty\n"),
]


def stubs(tmp_path, row: Row) -> dict[str, str]:
    """scontrol, squeue and srun on PATH; srun exits row.rc (at once, or once this shell passed it a USR2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    report = tmp_path / "nodes"
    report.write_text(row.bad_nodes)
    then = row.rc if row.then is None else row.then
    bodies = {
        # show hostnames: the nodelist expanded (node[1-2] and the exclusions' plain names)
        "scontrol": f'echo "scontrol $*" >> {log}\ncase "$1 $2" in\n'
                    '  "show hostnames") if [ "$3" = "node[1-2]" ]; then echo node1; echo node2; '
                    'else echo "$3" | tr , "\\n"; fi ;;\n'
                    f'  "show job") echo "{row.job}" ;;\nesac\n',
        "squeue": "echo 2026-11-22T03:00:00\n",
        "sinfo": "echo 2\n",  # the partition's nodes
        "srun": f'printf "%s\\n" "$@" > {tmp_path / "srun-args"}\n'
                f'echo "${{GPT_TRAIN_PREVIOUS_EXIT:-none}}" >> {tmp_path / "srun-runs"}\n'
                f'if [ "{row.signal}" = USR2 ]; then\n'
                f'  trap \'exit {row.rc}\' USR2\n  touch {tmp_path / "srun-ready"}\n  while :; do sleep 0.05; done\n'
                f'fi\n[ "$(wc -l < {tmp_path / "srun-runs"})" -gt 1 ] && exit {then}\nexit {row.rc}\n',
    }
    for name, body in bodies.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_RESTART_COUNT": str(row.restarts), "SLURM_JOB_NUM_NODES": "1",
            "GPT_TRAIN_NODE_REPORT": str(report)}


def inject(script: str, tmp_path, row: Row) -> str:
    """The batch shell gets row.signal while the ranks run (both scripts start them in gpt_train_launch)."""
    started = "    gpt_train_pid=$!\n"
    assert script.count(started) == 1
    if row.signal == "TERM":
        return script.replace(started, started + "    kill -TERM $$\n")
    if row.signal == "USR2":
        return script.replace(started, started + f"    until [ -e {tmp_path / 'srun-ready'} ]; do sleep 0.05; done\n"
                              "    kill -USR2 $$\n")
    return script


def run_sbatch(tmp_path, row: Row, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = inject(SBATCH.read_text(), tmp_path, row)
    env = {**env, "MAX_RESTARTS": str(CAP), "GPT_TRAIN_PYTHON": "python-x"}
    p = subprocess.run(["bash", "-c", script, "pretrain.sbatch", "gpt2", "optim.lr=1e-4", "x=a b"], env=env,
                       capture_output=True, text=True, timeout=60)
    srun_args = (tmp_path / "srun-args").read_text().splitlines()
    assert srun_args == ["--wait=60", "python-x", "-u", "-m", "gpt_train", "train", "gpt2", "optim.lr=1e-4", "x=a b"]
    if row.signal == "USR2":
        assert "USR2 (time limit near): passing it to the ranks" in p.stdout
    return p


def run_submitit(tmp_path, row: Row, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = submitit_script(tmp_path)
    assert f"#SBATCH --signal=USR2@{Resources().signal_delay_s}" in script.splitlines()  # to the ranks
    script = inject(script, tmp_path, row)
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert "-m\nsubmitit.core._submit\n" in (tmp_path / "srun-args").read_text()
    return p


@pytest.mark.parametrize("script,row", [pytest.param(s, r, id=f"{s}-{r.name}") for r in ROWS for s in r.scripts])
def test_requeue_decision(tmp_path, script, row):
    env = stubs(tmp_path, row)
    p = (run_sbatch if script == "sbatch" else run_submitit)(tmp_path, row, env)
    out = p.stdout + p.stderr
    calls = (tmp_path / "calls").read_text()
    start = rf"^gpt-train: job 4242 start {row.restarts + 1} at .* master node1:24242, ends 2026-11-22T03:00:00$"
    assert re.search(start, p.stdout, re.M), out  # the rendezvous: 20000 + 4242 % 20000
    runs = (tmp_path / "srun-runs").read_text().split()
    assert len(runs) == row.runs, out
    assert runs[1:] == ([str(row.rc)] * (row.runs - 1)), out  # each restart knows how the ranks ended before
    final = row.rc if row.then is None else row.then
    excluded = row.name == "bad-node"
    assert ("scontrol requeue 4242" in calls) == (row.requeued and not excluded), out
    assert ("scontrol requeuehold 4242" in calls) == excluded, out
    if excluded:  # a running job's ExcNodeList cannot change: held, changed, released
        assert calls.index("requeuehold") < calls.index("ExcNodeList=node2") < calls.index("scontrol release 4242")
        assert "without node(s) node2: injected (GPT_TRAIN_FAULT)" in p.stdout, out
        assert (tmp_path / "nodes").read_text() == "", "the report is emptied once its nodes are excluded"
    if row.bad_nodes and not excluded:
        assert "the partition would have too few nodes for the job" in out, out
    assert p.returncode == (0 if row.requeued else final), out
    if row.why is None:
        assert "requeueing" not in p.stdout, out
    elif row.requeued:
        assert f"gpt-train: {row.why}: requeueing job 4242 (restart 1 of at most {CAP})" in p.stdout, out
    else:
        assert f"gpt-train: {row.why}, but the job was restarted {CAP} times" in p.stdout, out
        assert "not requeueing" in p.stdout, out


# -- what srun and the containers get ------------------------------------------------------------------------

def record_srun_env(tmp_path, *names: str) -> None:
    """The srun stub also writes NAME=value (or NAME unset) for each of NAMES to tmp_path/srun-env."""
    srun = tmp_path / "bin" / "srun"
    lines = "".join(f'if [ -n "${{{n}+x}}" ]; then echo "{n}=${n}"; else echo "{n} unset"; fi >> {tmp_path / "srun-env"}\n'
                    for n in names)
    srun.write_text(srun.read_text().replace("#!/bin/bash\n", "#!/bin/bash\n" + lines, 1))


@pytest.mark.parametrize("cpus", ["8", None])
@pytest.mark.parametrize("script", ["sbatch", "submitit"])
def test_srun_gets_the_tasks_cpus(tmp_path, script, cpus):
    """Since SLURM 22.05 srun does not inherit --cpus-per-task: both batch shells pass SLURM_CPUS_PER_TASK on as
    SRUN_CPUS_PER_TASK, so that a rank gets its CPUs and not one core while OMP_NUM_THREADS says 8."""
    row = ROWS[0]
    env = {k: v for k, v in stubs(tmp_path, row).items()
           if k not in ("SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")}
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    record_srun_env(tmp_path, "SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS")
    p = (run_sbatch if script == "sbatch" else run_submitit)(tmp_path, row, env)
    assert p.returncode == 0, p.stdout + p.stderr
    seen = (tmp_path / "srun-env").read_text().splitlines()
    assert seen == ([f"SRUN_CPUS_PER_TASK={cpus}", f"OMP_NUM_THREADS={cpus}"] if cpus
                    else ["SRUN_CPUS_PER_TASK unset", "OMP_NUM_THREADS=1"])


@pytest.mark.parametrize("kind", ["APPTAINER_IMAGE", "CONTAINER_IMAGE"])
def test_sbatch_binds_a_writable_cache_into_the_container(tmp_path, kind):
    """An Apptainer image is read-only, and torch.compile writes its kernels under the image's /cache at the first
    step: slurm/pretrain.sbatch binds logs/JOB_NAME/cache of the submission folder there (made by the batch
    shell), as launch/slurm.py does (tests/test_launch.py), unless CONTAINER_MOUNTS binds /cache itself."""
    row = ROWS[0]
    work = tmp_path / "work"
    work.mkdir()
    env = {**stubs(tmp_path, row), kind: "/images/gpt.sif", "SLURM_JOB_NAME": "exp 1", "MAX_RESTARTS": "3"}
    env.pop("CONTAINER_MOUNTS", None)
    env.pop("CONTAINER_CACHE", None)
    p = subprocess.run(["bash", str(SBATCH), "gpt2"], env=env, cwd=work, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    args = (tmp_path / "srun-args").read_text().splitlines()
    cache = work / "logs" / "exp 1" / "cache"
    binds = f"{work}:{work},{cache}:/cache"
    if kind == "APPTAINER_IMAGE":
        assert args[args.index("--bind") + 1] == binds and args[args.index("--bind") + 2] == "/images/gpt.sif"
    else:
        assert f"--container-mounts={binds}" in args
    assert cache.is_dir()
    (tmp_path / "srun-args").unlink()
    env["CONTAINER_MOUNTS"] = f"{work}:{work},/scratch/kernels:/cache"
    p = subprocess.run(["bash", str(SBATCH), "gpt2"], env=env, cwd=work, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert env["CONTAINER_MOUNTS"] in "\n".join((tmp_path / "srun-args").read_text().splitlines())
    assert "logs/exp 1/cache:/cache" not in (tmp_path / "srun-args").read_text()
