"""launch/submit.py without a cluster: dry runs (SLURM, containers, local, docker), quoting, presets, the run
directory fixed at submission, credentials by name, and real torchrun runs on this machine (2 CPU ranks; two
"nodes" in network namespaces)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from gpt_train import protocol
from helpers import REPO, TINY, read_metrics, tiny_data  # noqa: F401
from launch import local, submit
from launch.slurm import Trainer, parse_time

SECRET = "s3cr3t-Value-that-must-not-leak"


def dry(capsys, *argv: str) -> str:
    """A dry run; SLURM's unless argv names a backend (a dry run needs no sbatch on this machine)."""
    backend = [] if "--backend" in argv else ["--backend", "slurm"]
    rc = submit.main([*backend, *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def section(text: str, title: str) -> str:
    """The lines under a `# ---- TITLE ...` header, up to the next header."""
    block = text.split(f"# ---- {title}", 1)[1].split("\n", 1)[1]
    return block.split("\n# ---- ", 1)[0]


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


def script_of(text: str) -> str:
    return section(text, "sbatch script")


def task_argv(text: str) -> list[str]:
    """The per-task command of a SLURM dry run, as the shell would split it (env assignments dropped)."""
    line = section(text, "each task").strip().splitlines()[0]
    return [w for w in shlex.split(line) if not re.match(r"^[A-Z_]+=", w)]


# -- SLURM dry runs ----------------------------------------------------------------------------------------------

def test_dry_run_for_two_gpu_nodes_shows_what_the_cluster_needs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--nodes", "2", "--gpus", "4", "--gpu", "--ib", "--socket-ifname", "ib0", "--nccl-debug", "INFO",
              "--partition", "gpu", "--time", "2-00:00:00", "gpt2-large")
    script = script_of(out)
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@180", "#SBATCH --time=2880", "#SBATCH --partition=gpu",
                 "#SBATCH --open-mode=append", "#SBATCH --job-name=gpt2-large", f"#SBATCH --chdir={tmp_path}",
                 "export NCCL_IB_DISABLE=0", "export NCCL_SOCKET_IFNAME=ib0", "export GLOO_SOCKET_IFNAME=ib0",
                 "export NCCL_DEBUG=INFO", "gpt_train_rendezvous"):
        assert line in script.splitlines(), line
    srun = [ln for ln in script.splitlines() if ln.startswith("gpt_train_launch srun ")]
    assert len(srun) == 1 and "--wait=60" in srun[0] and "-m submitit.core._submit" in srun[0]
    before, after = script.split(srun[0], 1)
    assert protocol.shell_text() in before  # the rendezvous and requeue functions (tests/test_protocol.py)
    # the requeue is the batch shell's, after srun, capped by SLURM_RESTART_COUNT
    assert after.rstrip().splitlines()[-2].startswith('gpt_train_requeue "$(gpt_train_requeue_why ')
    assert after.rstrip().splitlines()[-2].endswith('"${SLURM_RESTART_COUNT:-0}" 10')
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # it is valid shell
    shellcheck = _shellcheck()
    if shellcheck:
        p = subprocess.run([shellcheck, "-S", "warning", "-s", "bash", "-"], input=script, capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stdout
    assert "2 node(s) x 4 rank(s) = 8 rank(s), one task per GPU" in out
    assert task_argv(out)[-3:] == ["train", "gpt2-large", f"run_dir={tmp_path}/runs/gpt2-large"]
    assert "RANK=$SLURM_PROCID" in section(out, "each task")


def test_dry_run_cpu_ranks_request_no_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--nodes", "1", "--gpus", "2", "--cpu", "--cpus-per-task", "1", "default", "train.micro_batch=8")
    script = script_of(out)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "gpus" not in script and "gres" not in script
    assert "one task per CPU rank (gloo), no GPU requested" in out


def test_slurm_settings_and_extra_sbatch_arguments(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--gpus", "8", "--gpu", "--account", "proj", "--qos", "high", "--constraint", "a100&ib",
              "--mem", "200G", "--exclusive", "--job-name", "my run", "--max-restarts", "3", "--signal-delay", "300",
              "--sbatch-arg=--gres=gpu:a100:8", "--sbatch-arg=--mail-type=END", "--sbatch-arg=--hold", "gpt2")
    script = script_of(out)
    for line in ("#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint='a100&ib'", "#SBATCH --mem=200G",
                 "#SBATCH --exclusive", "#SBATCH --job-name=my-run", "#SBATCH --gres=gpu:a100:8",
                 "#SBATCH --mail-type=END", "#SBATCH --hold", "#SBATCH --signal=USR2@300"):
        assert line in script.splitlines(), line
    assert "--gpus-per-node" not in script  # --gres given: no second GPU request
    assert script.rstrip().splitlines()[-2].endswith('"${SLURM_RESTART_COUNT:-0}" 3') and "wckey" not in script
    assert f"run_dir={tmp_path}/runs/my-run" in out  # the job name replaces the last part of the config's run_dir


def test_containers_pyxis_and_apptainer(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--gpus", "4", "--gpu", "--container-image", "nvcr.io#nvidia/pytorch:24.05-py3", "gpt2")
    script = script_of(out)
    srun = next(ln for ln in script.splitlines() if ln.startswith("gpt_train_launch srun "))
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path}" in srun and f"--container-workdir={tmp_path}" in srun
    assert " python3 -u -m submitit.core._submit " in srun
    # requeue from the batch shell, outside the container
    assert "scontrol" not in srun and "gpt_train_requeue " in script.split(srun, 1)[1]

    out = dry(capsys, "--gpus", "4", "--gpu", "--apptainer", "/images/gpt train.sif", "--container-mounts",
              "/data:/data", "gpt2")
    srun = next(ln for ln in script_of(out).splitlines() if ln.startswith("gpt_train_launch srun "))
    assert (f"apptainer exec --nv --bind /data:/data,{tmp_path}/logs/gpt2/cache:/cache '/images/gpt train.sif' "
            "python3 -u -m submitit.core._submit") in srun
    assert "container-image" not in srun

    rc = submit.main(["--backend", "slurm", "--container-image", "a", "--apptainer", "b", "gpt2", "--dry-run"])
    assert rc == 2 and "not both" in capsys.readouterr().err


def test_containers_on_slurm_get_a_writable_cache_and_the_data(capsys, tmp_path, monkeypatch):
    """An Apptainer image is read-only, and torch.compile writes its kernels under the image's /cache at the
    first step: the job binds LOG_DIR/cache there, made by the batch shell before srun (slurm/pretrain.sbatch
    binds the same folder, tests/test_protocol.py), unless the given mounts bind /cache. A data.dir outside the
    working directory is bound read-only."""
    work, data = tmp_path / "work", tmp_path / "datasets"
    work.mkdir()
    data.mkdir()
    monkeypatch.chdir(work)
    cache = work / "logs" / "gpt2" / "cache"
    for flag in ("--apptainer", "--container-image"):
        script = script_of(dry(capsys, "--gpus", "4", "--gpu", flag, "/images/gpt.sif", "gpt2", f"data.dir={data}"))
        srun = next(ln for ln in script.splitlines() if ln.startswith("gpt_train_launch srun "))
        binds = f"{work}:{work},{data}:{data}:ro,{cache}:/cache"
        assert (f"--bind {binds} /images/gpt.sif" if flag == "--apptainer" else f"--container-mounts={binds}") in srun
        assert f"mkdir -p {cache}" in script.split(srun)[0]  # by the batch shell, before srun
    script = script_of(dry(capsys, "--gpus", "4", "--gpu", "--apptainer", "/i.sif", "--container-mounts",
                           "/data:/data,/scratch/kernels:/cache", "gpt2"))
    assert "--bind /data:/data,/scratch/kernels:/cache /i.sif" in script and str(cache) not in script


def test_sbatch_script_is_valid_and_documents_its_variables():
    path = REPO / "slurm" / "pretrain.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR2@180", "#SBATCH --open-mode=append",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"):
        assert line in text.splitlines()
    for var in ("GPT_TRAIN_PYTHON", "MAX_RESTARTS", "RUN_DIR", "CONTAINER_IMAGE", "APPTAINER_IMAGE",
                "CONTAINER_MOUNTS"):
        assert re.search(rf"^{var}=\$\{{{var}:-", text, re.M), var
    assert 'CONFIG=${1:-configs/gpt2.yaml}' in text
    assert '--container-image="$CONTAINER_IMAGE"' in text and 'apptainer exec --nv' in text
    assert 'gpt_train_requeue "$(gpt_train_requeue_why "$RC" "$gpt_train_term" "$gpt_train_usr2" "$JOB")" ' \
        '"$RESTARTS" "$MAX_RESTARTS"' in text.splitlines()
    shellcheck = _shellcheck()
    if shellcheck:
        p = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


# -- config, presets, run directory, quoting, credentials ----------------------------------------------------------

def test_presets_resolve_from_a_name_configs_and_config_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2-large", "config/gpt2-large.yaml", "configs/gpt2-large.yaml"):
        out = dry(capsys, "--gpu", name)
        assert f"# config: gpt2-large (preset {REPO}/configs/gpt2-large.yaml)" in out, name
        assert task_argv(out)[-3:-1] == ["train", "gpt2-large"]
    own = tmp_path / "config" / "gpt2-large.yaml"  # a real file of that name wins over the preset
    own.parent.mkdir()
    own.write_text("extends: gpt2-large\nrun_dir: runs/mine\n")
    out = dry(capsys, "--gpu", "config/gpt2-large.yaml")
    assert task_argv(out)[-3:] == ["train", str(own), f"run_dir={tmp_path}/runs/mine"]
    rc = submit.main(["--gpu", "gpt2-lrage", "--dry-run"])
    assert rc == 2 and "did you mean preset 'gpt2-large'" in capsys.readouterr().err


def test_config_is_validated_for_the_job_world_size(capsys):
    rc = submit.main(["--gpus", "3", "--gpu", "default", "--dry-run"])  # 4096 tokens = 32 x 128: not over 3 ranks
    assert rc == 2 and "train.batch_tokens" in capsys.readouterr().err
    rc = submit.main(["--gpu", "default", "optim.lrr=1", "--dry-run"])
    assert rc == 2 and "did you mean 'optim.lr'" in capsys.readouterr().err


def test_run_dir_is_fixed_at_submission(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert task_argv(dry(capsys, "--gpu", "gpt2"))[-1] == f"run_dir={tmp_path}/runs/gpt2"
    assert task_argv(dry(capsys, "--gpu", "--job-name", "exp7", "gpt2"))[-1] == f"run_dir={tmp_path}/runs/exp7"
    argv = task_argv(dry(capsys, "--gpu", "gpt2", "out_dir=rel/x", "optim.lr=1e-4"))
    assert argv[-2:] == ["optim.lr=1e-4", f"run_dir={tmp_path}/rel/x"] and "out_dir=rel/x" not in argv
    argv = task_argv(dry(capsys, "--gpu", "--run-dir", "s3://bucket/runs/a", "gpt2", "run_dir=ignored"))
    assert argv[-1] == "run_dir=s3://bucket/runs/a" and sum(a.startswith("run_dir=") for a in argv) == 1


@pytest.mark.parametrize("value", ["It's a \"test\" $HOME `id` \\n; rm -rf /tmp/x", "  spaced  out  ", "a=b=c"])
def test_every_override_reaches_the_job_quoted(capsys, tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    override = f"train.sample_prompt={value}"
    assert override in task_argv(dry(capsys, "--gpu", "gpt2", override))
    local = dry(capsys, "--backend", "local", "--gpus", "2", "gpt2", override)
    line = next(ln for ln in local.splitlines() if "torch.distributed.run" in ln)
    assert shlex.split(line)[-2] == override
    docker = dry(capsys, "--backend", "docker", "--cpu", "default", override)
    line = next(ln for ln in docker.splitlines() if ln.startswith("docker run"))
    assert shlex.split(line)[-2] == override


def test_credentials_are_passed_by_name_never_by_value(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "openwebtext").mkdir(parents=True)  # gpt2's data.dir: docker mounts it, so it must exist
    for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    outs = {
        "slurm": dry(capsys, "--gpu", "--nodes", "2", "--gpus", "4", "gpt2"),
        "local": dry(capsys, "--backend", "local", "--nodes", "2", "--gpus", "4", "--master-addr", "10.0.0.1", "gpt2"),
        "docker": dry(capsys, "--backend", "docker", "--gpu", "--gpus", "4", "gpt2"),
    }
    for backend, out in outs.items():
        assert SECRET not in out, backend
        for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN"):
            assert name in out, (backend, name)
    docker = shlex.split(next(ln for ln in outs["docker"].splitlines() if ln.startswith("docker run")))
    assert "--env=WANDB_API_KEY" in docker and "--env=AWS_SECRET_ACCESS_KEY" in docker and "--env=WANDB_MODE" in docker
    assert "--gpus=all" in docker and "--env=NPROC_PER_NODE=4" in docker and docker[-2:] == ["gpt2", docker[-1]]


# -- local backend: torchrun --------------------------------------------------------------------------------------

def test_local_multi_node_prints_every_node_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry(capsys, "--backend", "local", "--nodes", "2", "--gpus", "4", "--node-rank", "1", "--master-addr",
              "10.0.0.1", "--master-port", "29600", "--no-ib", "gpt2")
    assert "# node 0 (run on node)" in out and "# node 1 (this node)" in out
    lines = [shlex.split(ln) for ln in out.splitlines() if "torch.distributed.run" in ln]
    assert len(lines) == 2
    for rank, argv in enumerate(lines):
        assert argv[0] == "NCCL_IB_DISABLE=1"
        assert {"--nnodes=2", f"--node-rank={rank}", "--master-addr=10.0.0.1", "--master-port=29600",
                "--nproc-per-node=4"} <= set(argv)
        assert argv[-4:] == ["gpt_train", "train", "gpt2", f"run_dir={tmp_path}/runs/gpt2"]
    rc = submit.main(["--backend", "local", "--nodes", "2", "gpt2", "--dry-run"])
    assert rc == 2 and "--master-addr" in capsys.readouterr().err
    (tmp_path / "data" / "openwebtext").mkdir(parents=True)
    out = dry(capsys, "--backend", "docker", "--nodes", "2", "--gpus", "4", "--master-addr", "10.0.0.1", "gpt2")
    docker = [shlex.split(ln) for ln in out.splitlines() if ln.startswith("docker run")]
    assert "--env=TORCHRUN_ARGS=--nnodes=2 --node-rank=1 --master-addr=10.0.0.1 --master-port=29500" in docker[1]


# -- docker backend: who runs, what it sees ------------------------------------------------------------------------

def docker_argv(out: str) -> list[list[str]]:
    return [shlex.split(ln) for ln in out.splitlines() if ln.startswith("docker run")]


def test_docker_runs_as_the_owner_of_the_working_directory(capsys, tmp_path, monkeypatch):
    """Root's container runs as the owner of the working directory, who can write what is mounted from it (the
    image's user, 1000, cannot write a checkout it does not own); anyone else's as themselves. `make docker-run`
    asks the same function (tests/test_docker.py)."""
    work = tmp_path / "checkout"
    work.mkdir()
    if os.getuid() == 0:
        os.chown(work, 4321, 4322)
        want = "4321:4322"
    else:
        want = f"{os.getuid()}:{os.getgid()}"
    monkeypatch.chdir(work)
    argv = docker_argv(dry(capsys, "--backend", "docker", "--cpu", "default"))[0]
    assert [a for a in argv if a.startswith("--user")] == [f"--user={want}"]
    assert local.container_user(str(work)) == want


def test_docker_mounts_every_local_path_the_run_reads(capsys, tmp_path, monkeypatch):
    """The config file, data.dir, model.init_from, checkpoint.init_from (read-only) and the run_dir's parent are
    mounted at their own paths; one that does not exist is refused in one line, before any container starts."""
    work = tmp_path / "repo"
    (work / "data" / "local").mkdir(parents=True)
    monkeypatch.chdir(work)
    data, hf, ckpt, scratch = (tmp_path / "datasets" / "owt", tmp_path / "hf" / "gpt2", tmp_path / "old-run",
                               tmp_path / "scratch")
    for d in (data, hf, ckpt, scratch):
        d.mkdir(parents=True)
    conf = tmp_path / "configs" / "exp.yaml"
    conf.parent.mkdir()
    conf.write_text("extends: default\n")
    out = dry(capsys, "--backend", "docker", "--cpu", "--run-dir", str(scratch / "exp"), str(conf),
              f"data.dir={data}", f"model.init_from={hf}", f"checkpoint.init_from=file://{ckpt}")
    volumes = [a.removeprefix("--volume=") for a in docker_argv(out)[0] if a.startswith("--volume=")]
    assert sorted(volumes) == sorted([f"{work}:{work}", f"{scratch}:{scratch}", f"{data}:{data}:ro",
                                      f"{hf}:{hf}:ro", f"{ckpt}:{ckpt}:ro", f"{conf.parent}:{conf.parent}:ro"])
    out = dry(capsys, "--backend", "docker", "--cpu", "default", "data.dir=data/local")  # under the working dir
    assert [a for a in docker_argv(out)[0] if a.startswith("--volume=")] == [f"--volume={work}:{work}"]
    dry(capsys, "--backend", "docker", "--cpu", "default")  # the default data: the trainer prepares it in there

    for args, what in (([f"data.dir={tmp_path}/nope"], f"data.dir {tmp_path}/nope"),
                       (["data.dir=data/missing"], f"data.dir {work}/data/missing"),
                       ([f"model.init_from={tmp_path}/no-hf"], f"model.init_from {tmp_path}/no-hf"),
                       ([f"checkpoint.init_from={tmp_path}/no-run"], f"checkpoint.init_from {tmp_path}/no-run"),
                       (["--run-dir", f"{tmp_path}/no/such/run"], f"run_dir's parent {tmp_path}/no/such")):
        rc = submit.main(["--backend", "docker", "--cpu", "default", *args, "--dry-run"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and what in err and len(err.strip().splitlines()) == 1, (args, out, err)


def test_multi_node_docker_gets_the_rdma_devices_and_locked_memory(capsys, tmp_path, monkeypatch):
    """Without /dev/infiniband, IPC_LOCK and unlimited memlock NCCL silently falls back to TCP across nodes."""
    monkeypatch.chdir(tmp_path)
    ib = tmp_path / "infiniband"
    ib.mkdir()
    monkeypatch.setattr(local, "INFINIBAND", str(ib))
    multi = ("--backend", "docker", "--gpu", "--nodes", "2", "--gpus", "4", "--master-addr", "10.0.0.1", "default")
    commands = docker_argv(dry(capsys, *multi))
    assert len(commands) == 2
    for argv in commands:
        assert {f"--device={ib}", "--cap-add=IPC_LOCK", "--ulimit=memlock=-1"} <= set(argv)
    ib.rmdir()  # a host without InfiniBand: no device to pass
    argv = docker_argv(dry(capsys, *multi))[0]
    assert "--cap-add=IPC_LOCK" in argv and not any(a.startswith("--device") for a in argv)
    argv = docker_argv(dry(capsys, "--backend", "docker", "--gpu", "--gpus", "4", "default"))[0]
    assert not any(a.startswith(("--device", "--cap-add", "--ulimit")) for a in argv)


def test_backend_defaults_to_slurm_only_where_sbatch_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit.default_backend() == "local"
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "sbatch").chmod(0o755)
    assert submit.default_backend() == "slurm"


def test_a_trainer_resubmits_itself_on_submitit_usr2():
    """submitit's USR2 handler (while a run still loads) checkpoints through Checkpointable.checkpoint: the same
    callable again, its state being in the run directory."""
    from submitit.core.utils import DelayedSubmission

    trainer = Trainer("gpt2", ["optim.lr=1e-4"], {"NCCL_DEBUG": "INFO"})
    again = DelayedSubmission(trainer)._checkpoint_function()
    assert isinstance(again, DelayedSubmission) and again.function is trainer and not again.args


def test_parse_time():
    assert [parse_time(t) for t in ("90", "1:30", "01:00:00", "2-00", "1-12:30", "0-0:0:59", "24:00:00")] == \
        [90, 2, 60, 2880, 2190, 1, 1440]
    with pytest.raises(ValueError):
        parse_time("soon")


def _local_run(tiny_data, run_dir, *extra, env=None, prefix=(), timeout=300) -> subprocess.CompletedProcess:
    argv = [*prefix, sys.executable, str(REPO / "launch" / "submit.py"), "--backend", "local", *extra, "default",
            f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY, "max_steps=6"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def test_local_backend_runs_torchrun_with_two_cpu_ranks(tmp_path, tiny_data):
    run = tmp_path / "run"
    p = _local_run(tiny_data, run, "--gpus", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 --signals-to-handle=SIGTERM,SIGINT,"
            "SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout=150 -m gpt_train train default") in p.stdout
    assert "world: 2 rank(s) on 1 node(s)" in p.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.netns
def test_local_backend_two_nodes_in_network_namespaces(tmp_path, tiny_data, netns_hosts):
    """Node 0 in gtt-n1, node 1 in gtt-n2: each runs `submit.py --backend local --node-rank R`."""
    run = tmp_path / "run"
    env = {"GLOO_SOCKET_IFNAME": "eth0"}
    common = ("--nodes", "2", "--gpus", "1", "--master-addr", netns_hosts.addrs[0], "--master-port", "29731")
    argv = lambda r: [*netns_hosts.prefix(r), sys.executable, str(REPO / "launch" / "submit.py"), "--backend",  # noqa
                      "local", *common, "--node-rank", str(r), "default", f"data.dir={tiny_data}", f"run_dir={run}",
                      *TINY, "max_steps=4"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    procs = [subprocess.Popen(argv(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=full_env) for r in (0, 1)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert "world: 2 rank(s) on 2 node(s)" in outs[0], outs[0][-2000:]
    assert "--node-rank=1" in outs[0] and "# node 1 (run on node)" in outs[0]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert time.monotonic() - t0 < 240
