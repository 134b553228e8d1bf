"""torchrun on this machine: all of a one-node run, or one node of a multi-node run (the commands for the
other nodes are printed), or the same inside `docker run` with the project's image (docker/Dockerfile).

Without SLURM nothing requeues: a run stopped by a signal checkpoints and exits 75; starting the same command
again resumes it. After a crash or a hang the ranks are started again (gpt_train/supervise.py, the rules of the
batch shell: at most fault.in_job_restarts times, counted by the trainer, and at most --max-restarts here).

Whatever the run writes to the terminal also goes to a log file (tee()), since nothing else keeps it: the
launcher tells the ranks where (GPT_TRAIN_LOG), and `gpt-train logs` reads it from there.

`python3 -m launch.local user` prints container_user(): docker/docker.mk asks it, so that `make docker-run` and
`--backend docker` run the container as the same user by one rule. That needs only the standard library, so
this module imports the rest of launch (the config, yaml) where it is used.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launch.spec import JobSpec

INFINIBAND = "/dev/infiniband"  # RDMA devices: a multi-node container gets them when the host has them


@dataclass
class Node:
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 29500


def train_command(spec: JobSpec, node: Node, python: str) -> list[str]:
    """The command for one node: plain python for one rank, torchrun otherwise."""
    if spec.world_size == 1:
        return spec.train_command(python)
    argv = [python, "-m", "torch.distributed.run"]
    if spec.nodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    else:
        argv += [f"--nnodes={spec.nodes}", f"--node-rank={node.node_rank}", f"--master-addr={node.master_addr}",
                 f"--master-port={node.master_port}"]
    argv.append(f"--nproc-per-node={spec.ranks_per_node}")
    from gpt_train.supervise import torchrun_flags

    return argv + torchrun_flags() + ["-m", "gpt_train", *spec.train_args()]


def container_user(cwd: str | None = None) -> str:
    """UID:GID a container runs as: the caller's; for root, the owner of the working directory, so that the run
    can write the folders mounted from it (the image's user, 1000, cannot write a checkout it does not own) and
    what it writes belongs to whoever owns the checkout. The one rule for `--backend docker` and, through
    `python3 -m launch.local user`, for `make docker-run` (docker/docker.mk)."""
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    st = os.stat(cwd or os.getcwd())
    return f"{st.st_uid}:{st.st_gid}"


def docker_command(spec: JobSpec, node: Node, image: str, gpus: bool, environ: dict | None = None,
                   name: str = "", log: str = "") -> list[str]:
    """`docker run` of the image's entrypoint (`train CONFIG ...`; it starts torchrun with NPROC_PER_NODE ranks
    and TORCHRUN_ARGS). The working directory, a local run_dir's parent and every local path the config reads
    (spec.inputs: the config file, data.dir, checkpoint.init_from, model.init_from; read-only) are mounted at
    the same paths, so relative and absolute paths mean the same inside; one that does not exist here is refused
    (UserError) before any container starts. Multi-node: the RDMA devices, IPC_LOCK and unlimited locked memory
    for NCCL over InfiniBand (without them NCCL falls back to TCP without an error). Credentials go as
    `-e NAME`: docker copies the value from its own environment, so it never appears on the command line.
    NAME: the container's name, given to the ranks as GPT_TRAIN_CONTAINER (`docker stop NAME` reaches them:
    `gpt-train cancel`); LOG: where this machine keeps the run's output, given as GPT_TRAIN_LOG."""
    from gpt_train.errors import UserError
    from launch.spec import credential_names, mounts, passthrough_names, unmountable

    environ = os.environ if environ is None else environ
    cwd = os.getcwd()
    missing = unmountable(spec, cwd)
    if missing:
        raise UserError("--backend docker mounts every local path the run reads, but these are not on this "
                        f"machine: {'; '.join(missing)}")
    argv = ["docker", "run", "--rm", "--init", "--network=host", "--ipc=host", "--stop-timeout=180"]
    if name:
        argv.append(f"--name={name}")
    if gpus:
        argv.append("--gpus=all")
    argv.append(f"--user={container_user(cwd)}")
    if spec.nodes > 1:
        if os.path.exists(INFINIBAND):
            argv.append(f"--device={INFINIBAND}")
        argv += ["--cap-add=IPC_LOCK", "--ulimit=memlock=-1"]
    for path, writable in mounts(spec, cwd):
        argv.append(f"--volume={path}:{path}" + ("" if writable else ":ro"))
    argv.append(f"--workdir={cwd}")
    argv += [f"--env=NPROC_PER_NODE={spec.ranks_per_node}"]
    if spec.nodes > 1:
        argv.append(f"--env=TORCHRUN_ARGS=--nnodes={spec.nodes} --node-rank={node.node_rank} "
                    f"--master-addr={node.master_addr} --master-port={node.master_port}")
    argv += [f"--env={k}={v}" for k, v in spec.env.items()]
    argv += [f"--env={k}={v}" for k, v in (("GPT_TRAIN_CONTAINER", name), ("GPT_TRAIN_LOG", log)) if v]
    by_name = [n for n in credential_names(environ) + passthrough_names(environ) if n not in spec.env]
    argv += [f"--env={n}" for n in by_name]
    return argv + [image, *spec.train_args()]


def describe(spec: JobSpec, node: Node, commands: dict[int, list[str]], environ: dict | None = None) -> str:
    """The command of each node, the environment set by value, and the credentials passed by name."""
    from launch.spec import credential_names, quote

    lines = []
    env_prefix = quote([f"{k}={v}" for k, v in spec.env.items()])
    for rank, argv in sorted(commands.items()):
        head = "this node" if rank == node.node_rank else "run on node"
        label = f"# node {rank} ({head})" if spec.nodes > 1 else "# command"
        lines += [label, (env_prefix + " " if env_prefix else "") + quote(argv)]
    creds = credential_names(environ)
    if creds:
        lines.append("# credentials passed by name (from the environment; values not shown): " + " ".join(creds))
        if spec.nodes > 1:
            lines.append("# set them on every node before its command")
    return "\n".join(lines)


def python() -> str:
    return sys.executable


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _pump(source: int, terminal: int, log) -> None:
    """Copy a pipe to the terminal and the log until every writer has closed it."""
    while chunk := os.read(source, 1 << 16):
        try:
            _write_all(terminal, chunk)
        except OSError:  # the terminal went away (a closed ssh session): keep the log going
            pass
        log.write(chunk)
    os.close(source)


@contextmanager
def tee(path: str | Path) -> Iterator[None]:
    """Within: this process's stdout and stderr, and those of everything it starts, also go to PATH (appended).
    At the file-descriptor level, since the ranks write to the descriptors they inherit; by threads of this
    process, not a `tee` child, which a Ctrl-C or a signal to the process group would kill while the ranks
    still write their last checkpoint's lines."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab", buffering=0) as log:
        saved: dict[int, int] = {}
        pumps = []
        for fd in (1, 2):
            read, write = os.pipe()
            saved[fd] = os.dup(fd)
            os.dup2(write, fd)
            os.close(write)
            pumps.append(threading.Thread(target=_pump, args=(read, saved[fd], log), daemon=True))
            pumps[-1].start()
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in saved.items():
                os.dup2(original, fd)  # closes this process's end of the pipe
            for pump in pumps:  # the pipe ends once no child holds it either
                pump.join(timeout=10)
            for original in saved.values():
                os.close(original)


if __name__ == "__main__":
    if sys.argv[1:] != ["user"]:
        sys.exit("usage: python3 -m launch.local user   (prints the UID:GID a container runs as)")
    print(container_user())
