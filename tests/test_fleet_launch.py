"""launch/submit.py for many runs at once: sweeps (one SLURM job array; locally one run after another), chains
(--after, --then), the code snapshot a job imports, and what the launcher tells the ranks (GPT_TRAIN_LOG,
GPT_TRAIN_SUPERVISOR_PID, GPT_TRAIN_CONTAINER, GPT_TRAIN_SLURM_JOB, GPT_TRAIN_CODE_*).

Without a cluster: dry runs, the batch shells run in bash with stub SLURM commands, a local sweep. On the test
cluster (pytest.mark.slurm, docs/testing.md): a 2x2 sweep as one array, whose tasks a higher-priority job
preempts (each is requeued alone, its follow-up waits for it, and `gpt-train runs` / `logs` tell the story); a
job requeued after its checkout changed runs the submitted code; a job queued --after another starts after it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_launch import section
from test_slurm import jobs  # noqa: F401 (a fixture)

from helpers import REPO, TINY, cli, read_metrics, tiny_data  # noqa: F401
from launch import snapshot, submit
from launch.slurm import Resources, script_text
from launch.spec import JobSpec

SUBMIT = REPO / "launch" / "submit.py"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
STEP_LINE = re.compile(r"^step +\d+/\d+ \| loss", re.M)
STATUS = "gpt-train status {run_dir} --json > {run_dir}/status.json"  # an eval-like follow-up


def tiny(data: str, *extra: str, swept: tuple[str, ...] = ()) -> list[str]:
    """The tiny run's overrides, without those of the keys a test sweeps."""
    return [f"data.dir={data}", *(o for o in TINY if o.split("=", 1)[0] not in swept), *extra]


def dry(capsys, *argv: str) -> str:
    backend = [] if "--backend" in argv else ["--backend", "slurm", "--cpu"]
    rc = submit.main([*backend, *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def refused(capsys, *argv: str) -> str:
    """A submission refused in one line on stderr, before anything was printed or submitted."""
    rc = submit.main(["--backend", "slurm", "--cpu", *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    return err


def shellcheck(script: str) -> None:
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    tool = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    if tool:
        p = subprocess.run([tool, "-S", "warning", "-s", "bash", "-"], input=script, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


# -- sweeps, dry ---------------------------------------------------------------------------------------------------

def test_a_sweep_dry_run_shows_each_element_and_one_array_script(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "gpt2", "--sweep", "optim.lr=1e-4,3e-4,6e-4", "--sweep", "model.n_layer=6,12",
              "--max-parallel", "2", "schedule.min_lr=1e-5")
    sweep = f"{tmp_path}/runs/gpt2"
    rows = [ln.split() for ln in out.splitlines() if re.match(r"^# +\d+  ", ln)]
    assert rows == [["#", str(i), f"optim.lr={lr}", f"model.n_layer={n}", f"{sweep}/lr={lr},n_layer={n}"]
                    for i, (lr, n) in enumerate((lr, n) for lr in ("1e-4", "3e-4", "6e-4") for n in ("6", "12"))]
    assert f"# sweep: 6 element(s) under {sweep}" in out
    script = section(out, "sbatch script")
    lines = script.splitlines()
    assert "#SBATCH --array=0-5%2" in lines and f"#SBATCH --output={tmp_path}/logs/gpt2/%A_%a/%A_%a_0_log.out" in lines
    srun = next(ln for ln in lines if ln.startswith("gpt_train_launch srun "))
    assert f"--output {tmp_path}/logs/gpt2/%A_%a/%A_%a_%t_log.out" in srun  # where submitit looks for an array task
    # the protocol's scontrol and squeue calls name the task, whose own SLURM_JOB_ID may be the array's
    assert 'export GPT_TRAIN_SLURM_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in lines
    assert "scontrol() { gpt_train_as_task scontrol \"$@\"; }" in lines
    shellcheck(script)
    tasks = [shlex.split(ln) for ln in section(out, "each task").splitlines() if ln and not ln.startswith("#")]
    assert len(tasks) == 6
    assert tasks[3][-4:] == ["schedule.min_lr=1e-5", "optim.lr=3e-4", "model.n_layer=12",
                             f"run_dir={sweep}/lr=3e-4,n_layer=12"]


def test_a_sweep_over_a_key_that_is_not_a_config_key_is_refused_in_one_line(capsys):
    assert "--sweep optim.lrr=1,2: unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in refused(
        capsys, "gpt2", "--sweep", "optim.lrr=1,2")
    assert "optim.lr is both set and swept" in refused(capsys, "gpt2", "optim.lr=1e-4", "--sweep", "lr=1e-4,2e-4")
    assert "model.n_layer is swept twice" in refused(capsys, "gpt2", "--sweep", "n_layer=1,2", "--sweep",
                                                     "model.n_layer=3")
    assert "none empty" in refused(capsys, "gpt2", "--sweep", "model.n_layer=6,,12")
    assert "run directory is made from its values" in refused(capsys, "gpt2", "--sweep", "run_dir=a,b")
    assert "--max-parallel is for a sweep" in refused(capsys, "gpt2", "--max-parallel", "2")
    # each element's config is validated: this lr is below the preset's min_lr
    assert "must not exceed optim.lr" in refused(capsys, "gpt2", "--sweep", "optim.lr=1e-9,6e-4")


def test_run_directory_names_keep_only_safe_characters(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "default", "--sweep", "train.sample_prompt=a/b,c d?", "--sweep", "model.dropout=0.1")
    dirs = [ln.split()[-1] for ln in out.splitlines() if re.match(r"^# +\d+  ", ln)]
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["sample_prompt=a_b,dropout=0.1", "sample_prompt=c_d_,dropout=0.1"]
    # the prompt itself reaches the job as given
    assert "train.sample_prompt=c d?" in shlex.split(section(out, "each task").splitlines()[3])
    assert "would share the run directory" in refused(capsys, "default", "--sweep", "train.sample_prompt=a/b,a_b")


def test_a_sweep_of_one_value_is_a_plain_job(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "default", "--sweep", "model.n_layer=4")
    assert "--array" not in out and 'export GPT_TRAIN_SLURM_JOB="$SLURM_JOB_ID"' in out
    assert f"run_dir={tmp_path}/runs/default/n_layer=4" in out


# -- chains, dry -----------------------------------------------------------------------------------------------------

def test_after_and_then_in_a_dry_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "my runs" / "exp 1"
    out = dry(capsys, "-p", "debug", "--run-dir", str(run), "--after", "12", "--after", "34_2:any", "--then",
              "gpt-train eval {run_dir} --task val && echo '{done}' ${HOME}", "default")
    script = section(out, "sbatch script").splitlines()
    assert "#SBATCH --dependency=afterok:12,afterany:34_2" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
    assert "# after: --dependency=afterok:12,afterany:34_2" in out
    then = section(out, "follow-up job")
    shellcheck(then)
    lines = then.splitlines()
    for line in ("#SBATCH --dependency=afterok:JOBID", "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --ntasks=1",
                 "#SBATCH --partition=debug", f"#SBATCH --output={tmp_path}/logs/default/then-%j.out"):
        assert line in lines, line
    # {run_dir} only, as one shell word; the command's own braces untouched
    assert lines[-1] == f"gpt-train eval {shlex.quote(str(run))} --task val && echo '{{done}}' ${{HOME}}"
    assert any(ln.startswith("export PYTHONPATH=") for ln in lines)  # the follow-up imports the submitted code too

    sweep = dry(capsys, "--then", "gpt-train eval {run_dir}", "default", "--sweep", "model.n_layer=2,4")
    then = section(sweep, "follow-up job").splitlines()
    assert "#SBATCH --dependency=aftercorr:JOBID" in then and "#SBATCH --array=0-1%2" in then  # task i after task i
    assert f"  1) gpt-train eval {tmp_path}/runs/default/n_layer=4 ;;" in then


def test_bad_chains_are_refused(capsys):
    assert "--after 12:maybe: give a SLURM job id" in refused(capsys, "default", "--after", "12:maybe")
    assert "--then: the command is empty" in refused(capsys, "default", "--then", " ")
    rc = submit.main(["--backend", "local", "default", "--after", "12", "--dry-run"])
    assert rc == 2 and "--after needs SLURM" in capsys.readouterr().err


# -- the batch shells in bash, with stub SLURM commands ----------------------------------------------------------------

def stub_slurm(tmp_path, stdout: str = "/x/out.log") -> dict[str, str]:
    """scontrol, squeue, sinfo and srun on PATH: the calls go to tmp_path/calls, srun's environment to
    tmp_path/srun-env, srun exits SRUN_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, report = tmp_path / "calls", tmp_path / "nodes"
    report.write_text("")
    bodies = {
        "scontrol": f'echo "scontrol $*" >> {calls}\ncase "$1 $2" in\n  "show hostnames") echo node1 ;;\n'
                    f'  "show job") echo "JobId=$3 JobState=RUNNING"; echo "   StdOut={stdout}" ;;\nesac\n',
        "squeue": f'echo "squeue $*" >> {calls}\necho 2026-11-22T03:00:00\n',
        "sinfo": "echo 1\n",
        "srun": f"env > {tmp_path / 'srun-env'}\nexit ${{SRUN_RC:-0}}\n",
    }
    for name, body in bodies.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPT_TRAIN_"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1",
            "GPT_TRAIN_NODE_REPORT": str(report)}


def srun_env(tmp_path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (tmp_path / "srun-env").read_text().splitlines() if "=" in line)


def test_an_array_task_requeues_itself_not_the_array(tmp_path):
    """The task that SLURM gives the array's own id (the last one): its checkpointed stop requeues ARRAY_TASK,
    its end time and job info are its own; MASTER_PORT still comes from its own id."""
    spec = JobSpec(config="default", config_path=str(REPO / "configs" / "default.yaml"), overrides=[],
                   run_dir=str(tmp_path / "run"), job_name="gt")
    logs = tmp_path / "logs"
    env = {**stub_slurm(tmp_path), "SLURM_JOB_ID": "500", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "2",
           "SRUN_RC": "75"}
    script = script_text(spec, Resources(gpus=False, log_dir=str(logs), array=3))
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "scontrol requeue 500_2" in calls and "scontrol requeue 500" not in calls, calls
    assert "squeue -h -j 500_2 -o %e" in calls and "scontrol show job 500_2" in calls
    assert "requeueing job 500 (restart 1 of at most 10)" in p.stdout
    seen = srun_env(tmp_path)
    assert seen["MASTER_PORT"] == "20500" and seen["GPT_TRAIN_SLURM_JOB"] == "500_2"
    assert seen["GPT_TRAIN_LOG"] == f"{logs}/500_2/500_2_0_log.out"

    plain = tmp_path / "plain"
    plain.mkdir()
    env = {**stub_slurm(plain), "SLURM_JOB_ID": "4242"}
    p = subprocess.run(["bash", "-c", script_text(spec, Resources(gpus=False, log_dir=str(logs)))], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert srun_env(plain)["GPT_TRAIN_LOG"] == f"{logs}/4242/4242_0_log.out"
    assert srun_env(plain)["GPT_TRAIN_SLURM_JOB"] == "4242"


@pytest.mark.parametrize("array", [False, True])
def test_pretrain_sbatch_tells_the_ranks_its_log(tmp_path, array):
    env = {**stub_slurm(tmp_path, stdout="/home/me/gpt train-77.out"), "SLURM_JOB_ID": "77",
           "GPT_TRAIN_PYTHON": "python-x"}
    if array:
        env.update(SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="7")
    p = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), "default"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    own = "70_7" if array else "77"
    assert f"scontrol show job {own}" in (tmp_path / "calls").read_text()
    seen = srun_env(tmp_path)
    assert seen["GPT_TRAIN_LOG"] == "/home/me/gpt train-77.out" and seen["GPT_TRAIN_SLURM_JOB"] == own


# -- the code snapshot ------------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=repo, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


MARKER = '''
import os as _os
if _os.environ.get("GT_MARKER"):  # which code each process imported (tests/test_fleet_launch.py)
    with open(_os.environ["GT_MARKER"], "a") as _f:
        _f.write(f"v1 {_os.environ.get('SLURM_JOB_ID', '-')} {_os.environ.get('SLURM_RESTART_COUNT', '0')} "
                 f"{__file__}\\n")
'''


def git_copy(tmp_path) -> Path:
    """A checkout of its own: the package, the launcher and the presets of this one, committed, with a marker
    in gpt_train/__init__.py that says which copy a process imported."""
    repo = tmp_path / "checkout"
    for part in snapshot.PARTS:
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    (repo / "README.md").write_text("a copy\n")
    with open(repo / "gpt_train" / "__init__.py", "a") as f:
        f.write(MARKER)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "copy")
    return repo


def code_line(out: str) -> str:
    return re.search(r"^# code: (.+) \(copied at submission", out, re.M).group(1)


def test_the_snapshot_names_the_commit_and_whether_the_code_differs(tmp_path):
    repo = git_copy(tmp_path)
    commit = git(repo, "rev-parse", "HEAD")
    logs = tmp_path / "logs"

    def dry_from_copy() -> str:
        p = subprocess.run([sys.executable, str(repo / "launch" / "submit.py"), "--backend", "slurm", "--cpu",
                            "--log-dir", str(logs), "default", "--dry-run"], cwd=repo, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    out = dry_from_copy()
    clean = logs / f"code-{commit[:12]}"
    assert code_line(out) == f"commit {commit} (clean), snapshot {clean}"
    script = section(out, "sbatch script").splitlines()
    assert f'export PYTHONPATH={clean}"${{PYTHONPATH:+:$PYTHONPATH}}"' in script
    assert any(ln.startswith("export PYTHONSAFEPATH=1") for ln in script)
    assert f"export GPT_TRAIN_CODE_COMMIT={commit} GPT_TRAIN_CODE_DIR={clean}" in script
    assert not logs.exists()  # a dry run writes nothing

    (repo / "README.md").write_text("docs change\n")  # not code: still clean
    assert code_line(dry_from_copy()).endswith(f"(clean), snapshot {clean}")
    with open(repo / "launch" / "spec.py", "a") as f:
        f.write("# an edit\n")
    dirty = re.match(rf"commit {commit} \(dirty: .*\), snapshot ({logs}/code-{commit[:12]}-dirty-[0-9a-f]{{12}})$",
                     code_line(dry_from_copy()))
    assert dirty, dry_from_copy()

    snap = snapshot.plan(logs, source=repo)
    assert snap.label == commit + "+dirty" and str(snap.path) == dirty.group(1)
    assert snapshot.take(snap) == snap.path and (snap.path / "launch" / "spec.py").read_text().endswith("# an edit\n")
    assert (snap.path / "configs" / "default.yaml").is_file() and not (snap.path / "README.md").exists()
    assert snapshot.take(snapshot.plan(logs, source=repo)) == snap.path  # the same code: the same copy
    assert [p.name for p in logs.iterdir()] == [snap.path.name]


# -- local and docker -------------------------------------------------------------------------------------------------

def test_docker_gets_a_name_and_knows_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--backend", "docker", "--cpu", "--log-dir", str(tmp_path / "logs"), "default")
    argv = shlex.split(next(ln for ln in out.splitlines() if ln.startswith("docker run")))
    (name,) = [a.removeprefix("--name=") for a in argv if a.startswith("--name=")]
    assert re.fullmatch(r"gpt-train-default-[0-9a-f]{6}", name)
    assert f"--env=GPT_TRAIN_CONTAINER={name}" in argv
    (log,) = [a.removeprefix("--env=GPT_TRAIN_LOG=") for a in argv if a.startswith("--env=GPT_TRAIN_LOG=")]
    assert re.fullmatch(rf"{tmp_path}/logs/local-\d{{8}}-\d{{6}}\.log", log)
    assert "PYTHONPATH" not in out  # the image is the code


def test_a_local_sweep_runs_one_element_after_another_each_logged(tmp_path, tiny_data):
    """Two elements, one rank each: each runs in its own run directory and its output also goes to its own
    log file; the ranks learn the log, the supervisor's pid and the code; the follow-up runs after each."""
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    argv = [sys.executable, str(SUBMIT), "--backend", "local", "--log-dir", str(logs), "--run-dir", str(sweep),
            "--sweep", "model.n_embd=32,64", "--then", STATUS, "default",
            *tiny(tiny_data, "max_steps=4", swept=("model.n_embd",))]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-4000:]
    files = sorted(logs.glob("local-*.log"))
    assert [f.name[-6:] for f in files] == ["-0.log", "-1.log"], files
    ends = []
    for index, (width, log) in enumerate(zip((32, 64), files)):
        run = sweep / f"n_embd={width}"
        text = log.read_text()
        assert f"# ---- sweep element {index}: {run} ----" in text and "done: step 4" in text
        assert text.count("done: step 4") == 1 and STEP_LINE.search(text)
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["n_embd"] == width
        events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
        start = events[0]
        assert start["event"] == "start" and start["log"] == str(log) and start["supervisor_pid"] == p.pid, start
        assert start["code_commit"] and start["time"] > (ends[-1] if ends else 0)  # after the element before
        ends.append(events[-1]["time"])
        assert json.loads((run / "status.json").read_text())["finished"] is True
    assert out.count("done: step 4") == 2  # the terminal got it too


# -- on the test cluster ----------------------------------------------------------------------------------------------

def job_env(cluster, **extra: str) -> dict[str, str]:
    env = {**cluster.env, "GPT_TRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **extra}
    env.pop("GPT_TRAIN_DEADLINE", None)
    return env


def submit_slurm(cluster, cwd: Path, *argv: str, script: Path = SUBMIT, env: dict | None = None) -> str:
    p = subprocess.run([sys.executable, str(script), "--backend", "slurm", "--cpu", "-p", "debug", "-t", "10",
                        *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env or job_env(cluster))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def release(cluster, job: str, timeout: float = 120) -> None:
    """Start the requeued job without waiting out cred_expire; 2 s after it is PENDING, not in the second its
    last run ended (tests/test_slurm.py says why)."""
    cluster.wait_state(job, "PENDING", timeout=timeout)
    time.sleep(2)
    deadline = time.monotonic() + timeout
    while cluster.state(job) == "PENDING":
        cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        assert time.monotonic() < deadline, f"job {job} still pending after {timeout}s"
        time.sleep(1)


def wait_steps(path: Path, steps: int = 2, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(STEP_LINE.findall(path.read_text() if path.exists() else "")) < steps:
        assert time.monotonic() < deadline, f"{path} did not log {steps} steps in {timeout}s"
        time.sleep(0.2)


def runs_of(cluster, job: str) -> dict[str, list[dict[str, str]]]:
    """sacct's rows of every run of JOB (an array: of each task), by job id, oldest first."""
    rows = cluster.sacct(job, "JobID,JobIDRaw,State,Start,End", duplicates=True)
    out: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        out.setdefault(row["JobID"], []).append({**row, "State": row["State"].split()[0]})
    return out


def max_running(runs: dict[str, list[dict[str, str]]]) -> int:
    """The most runs at the same time (sacct's whole seconds: one that ends as another starts is not both)."""
    edges = sorted((t, step) for rows in runs.values() for r in rows for t, step in ((r["Start"], 1), (r["End"], -1)))
    running = peak = 0
    for _, step in edges:  # at the same second, the end (-1) sorts before the start
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_a_sweep_is_one_array_whose_tasks_requeue_alone_and_are_followed_up(slurm_cluster, tiny_data, tmp_path,
                                                                           jobs):
    """2 x 2 elements, at most 2 at a time. Once the last task (the one SLURM gives the array's own id) trains, a
    job of the higher-priority partition takes the whole node: SLURM preempts every task running then, each
    task's batch shell requeues that task alone, and each follow-up waits for its own task."""
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    out = submit_slurm(slurm_cluster, tmp_path, "--log-dir", str(logs), "--run-dir", str(sweep), "--max-parallel",
                       "2", "--sweep", "optim.lr=1e-3,3e-3", "--sweep", "model.n_embd=32,64", "--then", STATUS,
                       "default", *tiny(tiny_data, "max_steps=30", swept=("optim.lr", "model.n_embd")))
    array = re.search(r"^submitted job array (\d+): 4 element\(s\), at most 2 at a time$", out, re.M).group(1)
    then = re.search(r"^then: job (\d+) ", out, re.M).group(1)
    jobs += [array, then]
    names = ["lr=1e-3,n_embd=32", "lr=1e-3,n_embd=64", "lr=3e-3,n_embd=32", "lr=3e-3,n_embd=64"]
    tasks = [f"{array}_{i}" for i in range(4)]
    for i, name in enumerate(names):
        assert f"element {i}: job {tasks[i]}, run_dir {sweep}/{name}, log {logs}/{tasks[i]}/{tasks[i]}_0_log.out" \
            in out, out
    assert f"  gpt-train runs {sweep}" in out.splitlines()

    last = tasks[3]
    wait_steps(logs / last / f"{last}_0_log.out")
    urgent = slurm_cluster.sbatch("-p", "urgent", "--exclusive", "-J", "gt-urgent", "-o", os.devnull, wrap="sleep 1")
    jobs.append(urgent)
    assert slurm_cluster.wait_state(urgent, *TERMINAL, timeout=120) == "COMPLETED"  # it had the node to itself
    # which tasks were running then (the other one may have finished before SLURM chose): those it requeued
    preempted = [t for t in tasks if slurm_cluster.state(t) == "PENDING"]
    assert last in preempted, (preempted, runs_of(slurm_cluster, array))
    for task in preempted:
        release(slurm_cluster, task)
    for i in range(4):
        assert slurm_cluster.wait_state(tasks[i], *TERMINAL, timeout=240) == "COMPLETED", i
        assert slurm_cluster.wait_state(f"{then}_{i}", *TERMINAL, timeout=120) == "COMPLETED", i

    trained, followed = runs_of(slurm_cluster, array), runs_of(slurm_cluster, then)
    for task in tasks:  # a preempted task was requeued, and ran again under the same id
        states = [r["State"] for r in trained[task]]
        assert states == (["REQUEUED", "COMPLETED"] if task in preempted else ["COMPLETED"]), trained
        if task in preempted:
            log = (logs / task / f"{task}_0_log.out").read_text()
            assert "the ranks checkpointed and exited 75: requeueing job" in log, log[-3000:]
    assert trained[last][0]["JobIDRaw"] == array  # the task whose own id is the array's
    assert max_running(trained) == 2, trained

    for i, name in enumerate(names):
        run = sweep / name
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 31)), name
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["optim"]["lr"], cfg["model"]["n_embd"]) == ((1e-3, 3e-3)[i // 2], (32, 64)[i % 2])
        assert json.loads((run / "status.json").read_text())["finished"] is True
        assert followed[f"{then}_{i}"][-1]["Start"] >= trained[f"{array}_{i}"][-1]["End"], (followed, trained)
        kinds = [json.loads(ln)["event"] for ln in (run / "events.jsonl").read_text().splitlines()]
        assert kinds == (["start", "preempted", "resume", "finish"] if tasks[i] in preempted else
                         ["start", "finish"]), (name, kinds)

    # what the researcher reads in the morning: one table, and the stopped task's two attempts as one log
    p = cli("runs", str(sweep), "--json")
    assert p.returncode == 0, p.stderr
    table = {Path(r["run"]).name: r for r in json.loads(p.stdout)}
    assert sorted(table) == names and all(r["state"] == "finished" for r in table.values()), table
    assert [table[n]["restart_causes"] for n in names] == [["preempted"] if t in preempted else [] for t in tasks], \
        table
    p = cli("logs", str(sweep / names[3]))
    assert p.returncode == 0, p.stderr
    heads = [ln for ln in p.stdout.splitlines() if ln.startswith("--- attempt")]
    assert heads[0] == "--- attempt 1, started at step 0 ---", p.stdout[-3000:]
    assert re.fullmatch(r"--- attempt 2, resumed at step \d+ after: preempted \(SIGTERM\) ---", heads[1]), heads
    first, second = p.stdout.split(heads[1])
    assert STEP_LINE.search(first) and STEP_LINE.search(second) and "step     30/30" in second, p.stdout[-3000:]


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_a_requeue_runs_the_submitted_code_and_chains_wait(slurm_cluster, tiny_data, tmp_path, jobs):
    """Submitted from a checkout of its own, with a follow-up; a second job queued --after it. Once the first
    has finished, the checkout changes and the job is requeued: the new attempt still imports the snapshot."""
    repo = git_copy(tmp_path)
    commit = git(repo, "rev-parse", "HEAD")
    logs, marker, status = tmp_path / "logs", tmp_path / "imports", tmp_path / "status.json"
    env = job_env(slurm_cluster, GT_MARKER=str(marker))
    script = repo / "launch" / "submit.py"
    common = ["--log-dir", str(logs), "default", *tiny(tiny_data, "max_steps=6")]
    out = submit_slurm(slurm_cluster, repo, "--job-name", "gt-snap", "--run-dir", str(tmp_path / "run"),
                       "--then", f"gpt-train status {{run_dir}} --json > {status}", *common, script=script, env=env)
    job = re.search(r"^submitted job (\d+)$", out, re.M).group(1)
    then = re.search(r"^then: job (\d+) ", out, re.M).group(1)
    code = logs / f"code-{commit[:12]}"
    assert f"code: commit {commit} (clean), snapshot {code}" in out.splitlines()
    unknown = subprocess.run([sys.executable, str(script), "--backend", "slurm", "--cpu", "--after", "999999",
                              *common], capture_output=True, text=True, timeout=120, cwd=repo, env=env)
    assert unknown.returncode == 2 and "know no job 999999" in unknown.stderr  # SLURM would start it at once
    after = submit_slurm(slurm_cluster, repo, "--job-name", "gt-after", "--run-dir", str(tmp_path / "second"),
                         "--after", job, *common, script=script, env=env)
    second = re.search(r"^submitted job (\d+)$", after, re.M).group(1)
    jobs += [job, then, second]
    for j in (job, then, second):
        assert slurm_cluster.wait_state(j, *TERMINAL, timeout=240) == "COMPLETED", j
    ended = runs_of(slurm_cluster, job)[job][-1]["End"]
    assert runs_of(slurm_cluster, then)[then][0]["Start"] >= ended
    assert runs_of(slurm_cluster, second)[second][0]["Start"] >= ended
    assert json.loads(status.read_text())["finished"] is True  # the follow-up saw the finished run
    assert [p.name for p in logs.glob("code-*")] == [code.name]  # both jobs: the same code, one copy

    init = repo / "gpt_train" / "__init__.py"
    init.write_text(init.read_text().replace('f"v1 ', 'f"v2 '))  # the checkout moves on
    slurm_cluster.run("scontrol", "requeue", job)
    release(slurm_cluster, job)
    assert slurm_cluster.wait_state(job, *TERMINAL, timeout=240) == "COMPLETED"
    imports = [ln.split(" ", 3) for ln in marker.read_text().splitlines()]
    mine = [(v, restart, path) for v, jid, restart, path in imports if jid == job]
    assert {restart for _, restart, _ in mine} == {"0", "1"}, imports
    assert all(v == "v1" and path == f"{code}/gpt_train/__init__.py" for v, _, path in mine), imports
    log = (logs / job / f"{job}_0_log.out").read_text()
    assert log.count(f"gpt-train: code {commit} from {code}; log {logs}/{job}/{job}_0_log.out") == 2, log[-3000:]
