"""The container image: docker/Dockerfile, docker/entrypoint.sh, docker/docker.mk, .dockerignore (docs/docker.md).

With the real Docker engine (fixtures docker_engine / docker_base_image: a private dockerd and a local Debian + CPU
torch base image, since no registry is reachable): `make docker-build BASE_IMAGE=<test base>` builds the image,
`make docker-run GPUS=0` trains the embedded default in it as the non-root user with no network, into a mounted host
folder, and a second run resumes there; torchrun runs two ranks; `launch/submit.py --backend docker` runs a
named container that `gpt-train cancel` stops with a checkpoint; a code change rebuilds without reinstalling the
dependencies. Without an engine: the command lines `make docker-run DRY_RUN=1` gives a GPU host (GPUS=4, all,
0,2, 0), checked flag by flag and run through a stand-in `docker` to prove the printed line is the one that runs.
What needs a GPU (--gpus, NCCL, the CUDA base image) is only checked as command lines here.
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

from helpers import tiny_data  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
IMAGE, TAG = "gpt-train-test", "pytest"
REF = f"{IMAGE}:{TAG}"
IMAGE_UID = 1000  # docker/Dockerfile ARG APP_UID
# A few seconds a step on 2 busy cores; the same model in both runs, so the second can resume the first.
TINY = ("model.n_layer=1 model.n_head=2 model.n_embd=64 model.block_size=32 train.batch_tokens=128 "
        "train.micro_batch=2 train.eval_interval=2 train.eval_batches=1 train.log_interval=1 "
        "train.sample_tokens=4 checkpoint.interval=2")
SECRET = "s3cr3t-value-never-printed"

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
pytestmark = needs_make


def make(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(cwd), *args], capture_output=True,
                          text=True, env=env if env is not None else dict(os.environ), timeout=timeout)


def output(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------------------------
# the image, built once per session with the real engine (the engine keeps the layers between sessions)


@pytest.fixture(scope="module")
def image(docker_engine, docker_base_image) -> str:
    t0 = time.monotonic()
    p = make("docker-build", f"IMAGE={IMAGE}", f"TAG={TAG}", f"BASE_IMAGE={docker_base_image}",
             f"DOCKER_BUILD_FLAGS={' '.join(docker_engine.build_args)}", env=docker_engine.env, timeout=1500)
    assert p.returncode == 0, output(p)
    print(f"\nmake docker-build: {time.monotonic() - t0:.0f} s "
          f"({len(re.findall(r'Using cache', p.stdout))} steps from cache)", file=sys.stderr)
    yield REF
    docker_engine.run("image", "prune", "-f", check=False)   # superseded builds of this image; layers in use stay


def docker_run(engine, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return engine.run("run", "--rm", "--network", "none", *args, check=False, timeout=timeout)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_keeps_the_base_torch_and_installs_the_package(docker_engine, docker_base_image, image):
    probe = ("import os, sys, torch, gpt_train; "
             "print(torch.__version__, os.getuid(), os.getcwd(), gpt_train.__file__, sep='\\n')")
    base = docker_run(docker_engine, "--entrypoint", "python3", docker_base_image, "-c", "import torch; print(torch.__version__)")
    ours = docker_run(docker_engine, "--entrypoint", "python3", image, "-c", probe)
    assert base.returncode == 0 and ours.returncode == 0, output(base) + output(ours)
    torch_version, uid, cwd, package = ours.stdout.split()
    assert torch_version == base.stdout.strip()            # the base image's torch, not one pip brought
    assert uid == str(IMAGE_UID) and cwd == "/app"          # the non-root user, in the app folder
    assert "-packages/gpt_train/" in package                # installed from the repo, not loose scripts
    files = docker_run(docker_engine, "--entrypoint", "sh", image, "-c",
                       "ls /app/data/moby-dick-bpe16k; readlink /app/runs; ls -d /app/* | tr '\\n' ' '; "
                       "python3 -c 'import gpt_train.tokenizer as t, pathlib; "
                       "print(sorted(p.name for p in t._ASSETS.iterdir()))'")
    assert files.returncode == 0, output(files)
    assert "meta.json" in files.stdout and "/runs" in files.stdout and "encoder.json" in files.stdout
    assert "tokenizer.bpe" in files.stdout                  # the default preset's vocabulary, learned at build time
    assert "/app/data /app/runs " in files.stdout            # nothing else from the repository
    meta = docker_engine.run("image", "inspect", image, "-f", "{{json .Config}}").stdout
    config = json.loads(meta)
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/usr/local/bin/gpt-train-entrypoint"] and config["Cmd"] == ["default"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1" and env["NCCL_DEBUG"] == "WARN"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_make_docker_run_trains_offline_as_non_root_and_resumes(docker_engine, image, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["docker-run", "GPUS=0", f"IMAGE={IMAGE}", f"TAG={TAG}", f"RUNS_DIR={runs}", f"CACHE_DIR={cache}",
              "DATA_DIR=", "NETWORK=none"]   # no data mount: the corpus baked into the image; no network at all
    if os.geteuid() == 0:   # root's would run as the checkout's owner (root here): the image's own user instead
        common.append("DOCKER_USER=")
    first = make(*common, f"ARGS=train.max_steps=2 {TINY}", env=docker_engine.env)
    assert first.returncode == 0, output(first)
    log = first.stdout + first.stderr
    assert "no GPU visible: training in one process on CPU" in log
    assert "no checkpoint found: starting fresh" in log and "done: step 2" in log
    run_dir = runs / "default"                               # run_dir runs/default -> /app/runs -> /runs
    start = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
    assert start["launcher"] == "docker" and re.fullmatch(r"gpt-train-[0-9a-f]{6}", start["container"]), start
    ckpt = run_dir / "checkpoints" / "step-00000002"
    assert ckpt.is_dir() and (run_dir / "metrics.jsonl").is_file()
    owner = IMAGE_UID if os.geteuid() == 0 else os.geteuid()   # make runs a non-root caller as itself
    assert {p.stat().st_uid for p in [run_dir, ckpt, *ckpt.iterdir()]} == {owner}

    second = make(*common, f"ARGS=train.max_steps=4 {TINY}", env=docker_engine.env)
    assert second.returncode == 0, output(second)
    log = second.stdout + second.stderr
    assert "resuming from runs/default/checkpoints/step-00000002 (step 2)" in log and "done: step 4" in log
    assert (run_dir / "checkpoints" / "step-00000004").is_dir()
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {1, 2, 3, 4} <= set(steps)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_entrypoint_runs_torchrun_with_one_process_per_slot(docker_engine, image, tmp_path):
    """The GPU path (torchrun, one process per GPU) with NPROC_PER_NODE=2 standing in for two GPUs: gloo on CPU."""
    p = make("docker-run", "GPUS=0", f"IMAGE={IMAGE}", f"TAG={TAG}", f"RUNS_DIR={tmp_path / 'runs'}",
             f"CACHE_DIR={tmp_path / 'cache'}", "DATA_DIR=", "NETWORK=none", "DOCKER_RUN_FLAGS=-e NPROC_PER_NODE=2",
             f"ARGS=train.max_steps=2 {TINY}", env=docker_engine.env)
    assert p.returncode == 0, output(p)
    log = p.stdout + p.stderr
    assert "torchrun --nproc-per-node=2, OMP_NUM_THREADS=" in log
    assert "world: 2 rank(s) on 1 node(s)" in log and "launcher torchrun" in log and "done: step 2" in log


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_entrypoint_dispatch(docker_engine, image):
    prepare = docker_run(docker_engine, image, "prepare", "--help")
    assert prepare.returncode == 0 and "--out" in prepare.stdout, output(prepare)
    program = docker_run(docker_engine, image, "id", "-u")
    assert program.returncode == 0 and program.stdout.strip() == str(IMAGE_UID), output(program)
    dry = docker_run(docker_engine, "-e", "GPT_TRAIN_DRY_RUN=1", "-e", "NPROC_PER_NODE=4", image, "gpt2", "x=1")
    assert dry.returncode == 0, output(dry)
    words = shlex.split(dry.stdout)
    assert words[:6] == ["python3", "-m", "gpt_train.supervise", "--ranks", "4", "--"], output(dry)
    assert words[-10:] == ["--nproc-per-node=4", "--standalone", "--local-addr=127.0.0.1",
                           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", "--shutdown-timeout=150",
                           "-m", "gpt_train", "train", "gpt2", "x=1"], output(dry)
    cpu = docker_run(docker_engine, "-e", "GPT_TRAIN_DRY_RUN=1", image)
    assert shlex.split(cpu.stdout) == ["python3", "-m", "gpt_train.supervise", "--ranks", "1", "--", "python3", "-m",
                                       "gpt_train", "train", "default"], output(cpu)
    multi = docker_run(docker_engine, "-e", "GPT_TRAIN_DRY_RUN=1", "-e", "NPROC_PER_NODE=8", "-e",
                       "TORCHRUN_ARGS=--nnodes=2 --node-rank=1 --rdzv-backend=c10d --rdzv-endpoint=n1:29500",
                       image, "train", "gpt2")
    assert "--nnodes=2 --node-rank=1 --rdzv-backend=c10d --rdzv-endpoint=n1:29500 --signals-to-handle=" in multi.stdout
    assert multi.stdout.rstrip().endswith("--shutdown-timeout=150 -m gpt_train train gpt2"), output(multi)
    assert "--standalone" not in multi.stdout


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cancel_stops_the_container_of_a_submitted_run_with_a_checkpoint(docker_engine, image, tiny_data, tmp_path):
    """`launch/submit.py --backend docker` names its container and tells the ranks the name; `gpt-train cancel
    RUN` runs `docker stop` on it: the ranks checkpoint at the next step, the container is gone (and with
    --rm, removed), submit.py ends with the requeue code, and the table says stopped."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    argv = [sys.executable, str(REPO / "launch" / "submit.py"), "--backend", "docker", "--cpu", "--image", image,
            "--log-dir", str(logs), "--run-dir", str(run), "default", f"data.dir={tiny_data}", *TINY.split(),
            "train.max_steps=100000", "checkpoint.interval=1000"]
    sub = subprocess.Popen(argv, cwd=tmp_path, env=docker_engine.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert sub.poll() is None and time.monotonic() < deadline, "no step logged"
            time.sleep(0.5)
        start = json.loads((run / "events.jsonl").read_text().splitlines()[0])
        name = start["container"]
        assert start["launcher"] == "docker" and re.fullmatch(r"gpt-train-default-[0-9a-f]{6}", name), start
        assert docker_engine.run("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
        c = subprocess.run([sys.executable, "-m", "gpt_train", "cancel", str(run), "--wait", "180"],
                           capture_output=True, text=True, env=docker_engine.env, timeout=300)
        assert c.returncode == 0, c.stdout + c.stderr
        assert f"ran docker stop {name}" in c.stdout and "with a checkpoint" in c.stdout, c.stdout
        out = sub.communicate(timeout=120)[0]
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 75, out[-3000:]
    assert "the run checkpointed and stopped (exit 75)" in out
    assert docker_engine.run("ps", "-aq", "--filter", f"name={name}").stdout.strip() == ""
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "preempted", "cancelled"], events
    stop = events[1]
    assert stop["cause"] == "SIGTERM" and stop["checkpoint_landed"] is True and events[2]["step"] == stop["step"]
    assert (run / "checkpoints" / f"step-{stop['step']:08d}" / "MANIFEST.json").exists()
    p = subprocess.run([sys.executable, "-m", "gpt_train", "runs", str(run), "--json"], capture_output=True,
                       text=True, env=docker_engine.env, timeout=120)
    (row,) = json.loads(p.stdout)
    assert row["state"] == "stopped (cancelled)" and row["launcher"] == "docker", row


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_code_change_rebuild_reuses_dependency_layer_and_context_stays_small(docker_engine, docker_base_image,
                                                                             image, tmp_path):
    """A copy of the repository with a changed module and big data/runs/venv/cache folders: the build context
    leaves those out (.dockerignore), and only the layers from the package's install on are rebuilt."""
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md", ".dockerignore", "docker", "configs", "gpt_train", "launch"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    (src / "launch").mkdir(exist_ok=True)
    for junk in ("data/big.bin", "runs/x/ckpt.pt", ".venv/lib/big.so", ".cache/big", "wandb/big", ".git/big"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(os.urandom(1 << 20) * 8)   # 8 MB each
    with open(src / "gpt_train" / "__init__.py", "a") as f:
        f.write(f"\n# rebuilt by a test at {time.time()}\n")
    t0 = time.monotonic()
    p = make("docker-build", f"IMAGE={IMAGE}", f"TAG={TAG}-rebuild", f"BASE_IMAGE={docker_base_image}",
             f"DOCKER_BUILD_FLAGS={' '.join(docker_engine.build_args)}", cwd=src, env=docker_engine.env, timeout=900)
    seconds = time.monotonic() - t0
    try:
        assert p.returncode == 0, output(p)
        size = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", p.stdout)
        assert size, p.stdout[:2000]
        mb = float(size.group(1)) * {"B": 1e-6, "kB": 1e-3, "MB": 1, "GB": 1e3}[size.group(2)]
        assert mb < 10, f"build context {mb:.1f} MB: .dockerignore lets data, runs, caches or venvs in"
        steps = re.split(r"\nStep \d+/\d+ : ", p.stdout)
        deps = [s for s in steps if "-r /tmp/gpt-train/requirements.txt" in s.splitlines()[0]]
        package = [s for s in steps if "--no-deps" in s.splitlines()[0]]
        assert len(deps) == 1 and len(package) == 1, p.stdout[-3000:]
        assert "Using cache" in deps[0], "the dependency layer was rebuilt after a code change:\n" + deps[0][:2000]
        assert "Using cache" not in package[0], "the package layer did not pick up the code change"
        print(f"\nrebuild after a code change: {seconds:.0f} s, context {mb:.1f} MB", file=sys.stderr)
    finally:
        docker_engine.run("rmi", f"{REF}-rebuild", check=False)


# ---------------------------------------------------------------------------------------------------------------
# command lines for a GPU host (no engine needed)


@pytest.fixture
def dry_env(tmp_path) -> dict:
    key = tmp_path / "gcp-key.json"
    key.write_text("{}")
    aws = tmp_path / "aws"
    aws.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "AWS_", "GOOGLE_", "NCCL_", "HF_"))}
    env.update(WANDB_API_KEY=SECRET, AWS_ACCESS_KEY_ID=SECRET, AWS_SECRET_ACCESS_KEY=SECRET,
               GOOGLE_APPLICATION_CREDENTIALS=str(key), AWS_DIR=str(aws))
    return env


DRY_DEFAULTS = ("IMAGE=registry.example/gpt-train", "TAG=v1", "CONFIG=gpt2", "ARGS=train.max_steps=10 optim.lr=3e-4",
                "RUNS_DIR=/scratch/my_runs")


def dry_run(env: dict, *args: str) -> list[str]:
    """`make docker-run DRY_RUN=1` with DRY_DEFAULTS, then ARGS (a later VAR=value wins): the printed words."""
    p = make("docker-run", "DRY_RUN=1", *DRY_DEFAULTS, *args, env=env)
    assert p.returncode == 0, output(p)
    assert SECRET not in p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    return shlex.split(lines[0])


def flag_values(argv: list[str], flag: str) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == flag:
            out.append(argv[i + 1])
        elif a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out


@pytest.mark.parametrize("gpus, device, nproc", [
    ("4", '"device=0,1,2,3"', "4"),
    ("all", "all", None),
    ("0,2", '"device=0,2"', "2"),
    ("3,", '"device=3"', "1"),
    ("device=GPU-5c1d", '"device=GPU-5c1d"', "1"),
    ("0", None, None),
])
def test_docker_run_dry_run_flags(dry_env, gpus, device, nproc):
    argv = dry_run(dry_env, f"GPUS={gpus}")
    assert argv[:4] == ["docker", "run", "--rm", "--init"]
    assert flag_values(argv, "--gpus") == ([device] if device else [])
    envs = flag_values(argv, "-e")
    assert [e for e in envs if e.startswith("NPROC_PER_NODE")] == ([f"NPROC_PER_NODE={nproc}"] if nproc else [])
    assert flag_values(argv, "--ipc") == ["host"]
    ulimits = flag_values(argv, "--ulimit")
    assert ulimits == (["memlock=-1", "stack=67108864"] if device else [])   # CPU: no memlock (see docker.mk)
    # credentials by name only; key files read-only
    for name in ("WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in envs
    assert "GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/gcp-credentials.json" in envs
    mounts = flag_values(argv, "-v")
    assert f"{dry_env['GOOGLE_APPLICATION_CREDENTIALS']}:/run/secrets/gcp-credentials.json:ro" in mounts
    assert f"{dry_env['AWS_DIR']}:/run/secrets/aws:ro" in mounts
    assert "/scratch/my_runs:/runs" in mounts and f"{REPO}/.cache:/cache" in mounts
    assert f"{REPO}/configs:/app/configs:ro" in mounts
    assert flag_values(argv, "--network") == ["host"] and flag_values(argv, "--stop-timeout") == ["180"]
    (name,) = flag_values(argv, "--name")  # drawn per call; the ranks record it, so gpt-train cancel finds it
    assert re.fullmatch(r"gpt-train-[0-9a-f]{6}", name) and f"GPT_TRAIN_CONTAINER={name}" in envs
    assert argv[-4:] == ["registry.example/gpt-train:v1", "gpt2", "train.max_steps=10", "optim.lr=3e-4"]
    # anyone runs as themselves; root as the owner of the working directory (launch/local.py container_user)
    owner = REPO.stat() if os.geteuid() == 0 else None
    assert flag_values(argv, "--user") == [f"{owner.st_uid}:{owner.st_gid}" if owner else f"{os.getuid()}:{os.getgid()}"]


def test_docker_run_dry_run_options(dry_env, tmp_path):
    data = tmp_path / "datasets"
    data.mkdir()
    argv = dry_run(dry_env, "GPUS=0", "IPC=", "SHM_SIZE=32g", f"DATA_DIR={data}", "NETWORK=", "AWS_DIR=",
                   "DOCKER_NAME=my-run", "DOCKER_RUN_FLAGS=--label team=nlp")
    assert flag_values(argv, "--shm-size") == ["32g"] and not flag_values(argv, "--ipc")
    assert f"{data}:{data}:ro" in flag_values(argv, "-v")     # absolute DATA_DIR: the same path inside
    assert not flag_values(argv, "--network") and flag_values(argv, "--name") == ["my-run"]
    assert "GPT_TRAIN_CONTAINER=my-run" in flag_values(argv, "-e") and flag_values(argv, "--label") == ["team=nlp"]
    unnamed = dry_run(dry_env, "GPUS=0", "DOCKER_NAME=")
    assert not flag_values(unnamed, "--name") and not any("GPT_TRAIN_CONTAINER" in e for e in unnamed)
    assert not any("/run/secrets/aws" in v for v in flag_values(argv, "-v"))
    unset = {k: v for k, v in dry_env.items() if k not in ("WANDB_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS")}
    argv = dry_run(unset, "GPUS=0", "DATA_DIR=data/moby-dick-bpe16k")
    # an unset variable is not passed (`-e NAME` would unset the image's value); a missing DATA_DIR is not mounted
    assert "WANDB_API_KEY" not in flag_values(argv, "-e") and "NCCL_DEBUG" not in flag_values(argv, "-e")
    if not (REPO / "data" / "moby-dick-bpe16k").exists():
        assert not any(":/app/data/" in v for v in flag_values(argv, "-v"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a checkout owned by another user")
def test_root_runs_the_container_as_the_owner_of_the_checkout(dry_env, tmp_path):
    """As root in a checkout owned by someone else, `make docker-run` runs the container as that owner (the image's
    user could not write the checkout's runs/ and .cache/), by the rule `gpt-train-submit --backend docker` uses
    (launch/local.py container_user(), asked with the standard library only: the copy has no gpt_train), and
    makes missing RUNS_DIR/CACHE_DIR owned by that user. DOCKER_USER= still gives the image's own user."""
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("Makefile", "docker", "launch"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    os.chown(src, 4321, 4322)
    p = make("docker-run", "DRY_RUN=1", "GPUS=0", cwd=src, env=dry_env)
    assert p.returncode == 0, output(p)
    assert flag_values(shlex.split(p.stdout), "--user") == ["4321:4322"]
    p = make("docker-run", "DRY_RUN=1", "GPUS=0", "DOCKER_USER=", cwd=src, env=dry_env)
    assert p.returncode == 0 and not flag_values(shlex.split(p.stdout), "--user"), output(p)
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    p = make("docker-run", "GPUS=0", f"DOCKER={fake}", cwd=src, env=dry_env)
    assert p.returncode == 0, output(p)
    assert {((src / d).stat().st_uid, (src / d).stat().st_gid) for d in ("runs", ".cache")} == {(4321, 4322)}


def test_docker_run_rejects_a_bad_gpus_value(dry_env):
    p = make("docker-run", "DRY_RUN=1", "GPUS=two", env=dry_env)
    assert p.returncode != 0 and "GPUS='two'" in p.stderr


def test_dry_run_prints_exactly_what_runs(dry_env, tmp_path):
    """A stand-in `docker` records its argv: running the target gives the same words as the DRY_RUN line,
    quoting included, and the secret values reach docker only through its environment."""
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n" + f'"{sys.executable}" -c "import json, os, sys; '
                    "json.dump({'argv': sys.argv[1:], 'key': os.environ.get('WANDB_API_KEY')}, "
                    f"open('{tmp_path}/argv.json', 'w'))\" \"$@\"\n")
    fake.chmod(0o755)
    args = ["GPUS=0,1", f"RUNS_DIR={tmp_path / 'runs'}", f"CACHE_DIR={tmp_path / 'cache'}",
            "ARGS=train.sample_prompt=It's;&|<x> run_dir=runs/a*b", "DOCKER_NAME=gt-exact"]  # else drawn per call
    printed = dry_run(dry_env, *args)
    p = make("docker-run", *DRY_DEFAULTS, *args, f"DOCKER={fake}", env=dry_env)
    assert p.returncode == 0, output(p)
    ran = json.loads((tmp_path / "argv.json").read_text())
    assert ["docker", *ran["argv"]] == printed
    assert ran["key"] == SECRET
    assert printed[-3:] == ["gpt2", "train.sample_prompt=It's;&|<x>", "run_dir=runs/a*b"]
    assert (tmp_path / "runs").is_dir() and (tmp_path / "cache").is_dir()   # made for the container to write


def test_docker_build_and_push_dry_run(dry_env):
    p = make("docker-build", "DRY_RUN=1", "IMAGE=registry.example/gpt-train", "TAG=v1",
             "BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime", "DOCKER_BUILD_FLAGS=--pull", env=dry_env)
    assert p.returncode == 0, output(p)
    argv = shlex.split(p.stdout)
    assert argv[:2] == ["docker", "build"] and argv[-1] == "."
    assert flag_values(argv, "-f") == ["docker/Dockerfile"] and flag_values(argv, "-t") == ["registry.example/gpt-train:v1"]
    assert flag_values(argv, "--build-arg") == ["BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime"]
    assert "--pull" in argv
    p = make("docker-build", "DRY_RUN=1", env=dry_env)
    assert "--build-arg" not in p.stdout          # the Dockerfile's pinned base
    p = make("docker-push", "DRY_RUN=1", "IMAGE=registry.example/gpt-train", "TAG=v1", env=dry_env)
    assert shlex.split(p.stdout) == ["docker", "push", "registry.example/gpt-train:v1"]
