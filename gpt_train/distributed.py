"""Who this process is in the job, whatever launched it (one process, torchrun, srun, submitit), and the
process group it joins and leaves.

The launcher's environment is read once into a `World`; the rest of the code asks the World
and never reads RANK or SLURM_* itself. How the model is spread over the ranks is `parallel.py`;
the collectives the trainer's ranks agree with are `collectives.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt_train import protocol
from gpt_train.errors import ConfigError, UserError


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "single"  # single | torchrun | srun | submitit | env (RANK/WORLD_SIZE set by something else)
    master_addr: str = ""
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> str:
        return (f"{self.world_size} rank(s) on {self.nodes} node(s) ({self.local_world_size} per node), "
                f"launcher {self.launcher}")


def detect_world(env: dict[str, str] | None = None) -> World:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, submitit's helper, or anything setting the c10d variables
        return World(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "submitit" if "SUBMITIT_EXECUTOR" in env else "env",
            master_addr=env.get("MASTER_ADDR", ""),
            master_port=int(env.get("MASTER_PORT", 0)),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun, one task per GPU
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
        return World(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=int(env["SLURM_NTASKS"]) // nodes,
            launcher="srun",
            master_addr=env.get("MASTER_ADDR") or protocol.master_address(nodelist),
            master_port=int(env.get("MASTER_PORT") or protocol.master_port(env.get("SLURM_JOB_ID", "0"))),
        )
    return World()


NVIDIA_DEVICE_NODES = "/dev/nvidia[0-9]*"  # one per GPU (not nvidiactl, nvidia-uvm): what --gpus/--device pass in
HIDDEN = {"", "-1", "none", "nodevfiles"}  # CUDA_VISIBLE_DEVICES values that hide every GPU on purpose


def gpus_present(environ: dict[str, str] | None = None) -> str:
    """What says that this process was given NVIDIA GPUs, whatever CUDA makes of them; "" when nothing does.

    CUDA_VISIBLE_DEVICES set to hide them all ("", -1, NoDevFiles) means none, on purpose. Otherwise, in order:
    GPU device nodes (/dev/nvidia0, ...), CUDA_VISIBLE_DEVICES naming devices, `nvidia-smi -L` (NVML) listing
    GPUs. torch.cuda.is_available() says False both without GPUs and when CUDA cannot start (a driver older than
    the CUDA that torch is built for, a CPU-only torch): this tells the two apart."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() in HIDDEN:
        return ""
    nodes = sorted(glob.glob(NVIDIA_DEVICE_NODES))
    if nodes:
        return "device node(s) " + ", ".join(nodes[:4]) + (", ..." if len(nodes) > 4 else "")
    if visible:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"nvidia-smi lists {len(gpus)} GPU(s)"
    return ""


def cuda_unusable(what: str, present: str) -> str:
    """The message for GPUs that are there (`present`, from gpus_present) but that CUDA cannot use: why, and
    what to do about it."""
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as e:  # whatever CUDA's initialization says is the reason to show
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if torch.version.cuda:
        build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; a driver older than that CUDA "
                 "cannot start it (nvidia-smi shows the newest CUDA the driver supports): update the driver, "
                 "or install a torch built for the driver's CUDA")
    elif getattr(torch.version, "hip", None):
        build = f"torch {torch.__version__} is built for ROCm {torch.version.hip}, not CUDA: install a CUDA build"
    else:
        build = (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): "
                 "install a CUDA build of torch")
    return (f"{what}, and this machine has GPUs ({present}) but CUDA cannot use them: {reason}. {build}. "
            "To train on the CPU anyway, set train.device=cpu (--device cpu for the one-process commands).")


def cuda_device_count() -> int:
    """How many GPUs the ranks of this machine will use: torch's CUDA count (it honours CUDA_VISIBLE_DEVICES and
    SLURM's binding), 0 without GPUs, and a UserError for GPUs that CUDA cannot use, as in pick_device. The
    Docker entrypoint starts this many ranks, so that it never starts them on GPUs the ranks cannot use."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    present = gpus_present()
    if present:
        raise UserError(cuda_unusable("torch.cuda.device_count() is 0", present))
    return 0


_CLAIMED: dict[str, tuple[int, object]] = {}  # job -> (index, the open lock file that holds that GPU)


def _gpu_identity(index: int) -> str:
    """The same string for one GPU in every process of the node, whatever CUDA_VISIBLE_DEVICES each one has."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid:
        return str(uuid)
    if hasattr(props, "pci_bus_id"):
        return f"pci-{props.pci_domain_id:04x}-{props.pci_bus_id:02x}-{props.pci_device_id:02x}"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def _job_key(world: World) -> str:
    """This job step, the same for all its ranks on the node: ranks of another job, or another step of this one
    (a `gpt-train env` next to the training), never compete with it for a GPU."""
    if "SLURM_JOB_ID" in os.environ:
        key = f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}"
    else:
        key = os.environ.get("TORCHELASTIC_RUN_ID") or f"{world.master_addr}-{world.master_port}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _claim_gpu(world: World, count: int) -> int:
    """One of the `count` GPUs this task sees that no other rank of its job on this node holds, by a lock file
    per GPU (flock: the kernel lets go when the process ends, however it ends). local_rank % count is tried
    first, then the next ones."""
    job = _job_key(world)
    if job in _CLAIMED:  # this process already holds one (pick_device called again)
        return _CLAIMED[job][0]
    first = world.local_rank % count
    prefix = os.path.join(tempfile.gettempdir(), f"gpt-train-{os.getuid()}-{job}-gpu-")
    for step in range(count):
        index = (first + step) % count
        path = prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", _gpu_identity(index)) + ".lock"
        try:
            lock = open(path, "a")  # held open for the life of the process
        except OSError:
            return first  # no place for locks: the first choice (NCCL stops on two ranks sharing a GPU)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _CLAIMED[job] = (index, lock)
        return index
    raise UserError(f"local rank {world.local_rank}: all {count} GPU(s) it sees are taken by other ranks of this job "
                    f"on this node ({world.local_world_size} local ranks): give every rank a GPU of its own "
                    "(srun --gpus-per-task=1, or as many GPUs per node as tasks per node)")


def cuda_index(world: World, count: int) -> int:
    """Which of the `count` GPUs this process sees is its own. The rule:

    - count == 1: GPU 0. One GPU per task: srun --gpus-per-task=1, a binding that gives each task one GPU, or a
      single-GPU machine.
    - count >= local_world_size: GPU local_rank. Every rank sees all the node's GPUs (torchrun, srun without a
      binding) or a subset at least as large as the node's task count.
    - 1 < count < local_world_size, under torchrun or alone: an error. torchrun does not split GPUs between
      its ranks, so every local rank sees the same `count` GPUs: there are too few.
    - 1 < count < local_world_size otherwise (srun with --gpu-bind=closest, --gpus-per-task=k, or any binding
      that gives several tasks the same subset of k GPUs): the task claims a GPU of its subset that no other
      rank of this job on the node holds (a lock file per GPU), trying local_rank % count first. That first
      choice alone is right when the tasks that share a subset are consecutive local ranks (`-m *:block`), but
      SLURM's default distribution, block:cyclic, deals tasks to the sockets in turn: with closest binding on 2
      sockets of 4 GPUs, local ranks 0, 2, 4, 6 share GPUs 0-3, and local_rank % 4 would put ranks 0 and 4 on
      the same one. More tasks in a subset than GPUs in it is an error, naming the rank.
    """
    if count == 1:
        return 0
    if count >= world.local_world_size:
        return world.local_rank
    if world.launcher in ("torchrun", "single"):
        raise UserError(f"local rank {world.local_rank} has no GPU: {count} visible on this node "
                        f"for {world.local_world_size} local rank(s)")
    return _claim_gpu(world, count)


def pick_device(requested: str, world: World) -> torch.device:
    """One device per local rank (which GPU: `cuda_index`). `auto` is CUDA when CUDA works, and an error when the
    machine has GPUs that CUDA cannot use (gpus_present): never a silent fall back to the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif present := gpus_present():
            raise UserError(cuda_unusable("train.device=auto", present))
        else:
            requested = "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            if present := gpus_present():
                raise UserError(cuda_unusable("train.device=cuda", present))
            raise UserError("train.device=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        index = cuda_index(world, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available on this machine")
    return torch.device(requested)


# -- the environment of the process group ---------------------------------------------------------

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True when `host` can only mean this machine to whoever resolves it (127.x, ::1, localhost, or a name
    that resolves only to those). A node's own host name is not: Debian maps it to 127.0.1.1 on the node
    itself while the other nodes resolve it to the node's real address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    if name in LOCAL_NAMES:
        return True
    own = {socket.gethostname().lower(), socket.getfqdn().lower()} - LOCAL_NAMES
    if name in own or name in {n.split(".")[0] for n in own}:
        return False
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False  # unresolvable here: the rendezvous reports it, naming the address
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def env_settings(cfg) -> dict[str, str]:
    """The communication variables that a DistributedConfig sets, name -> value (unset fields give none)."""
    return protocol.comm_env(cfg.socket_ifname, cfg.ib, cfg.nccl_debug, cfg.async_error_handling)


COMM_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "TORCHELASTIC_")


def comm_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of the environment that steer rendezvous and collectives."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith(COMM_VARIABLES)}


def rendezvous_address(world: World, cfg) -> tuple[str, int, str]:
    """(address, port, where they came from). torchrun's rendezvous has already picked them; elsewhere a
    value in the config wins over the launcher's, and 127.0.0.1:29500 is the last resort."""
    if world.launcher == "torchrun":
        return world.master_addr, world.master_port, "torchrun"
    addr, addr_from = (cfg.master_addr, "config") if cfg.master_addr else (world.master_addr, world.launcher)
    port, port_from = (cfg.master_port, "config") if cfg.master_port else (world.master_port, world.launcher)
    if not addr:
        addr, addr_from = "127.0.0.1", "default"
    if not port:
        port, port_from = 29500, "default"
    return addr, int(port), addr_from if addr_from == port_from else f"{addr_from}/{port_from}"


def check_master(world: World, addr: str, port: int) -> str | None:
    """Why this world cannot meet at addr:port, or None."""
    if not 0 < port < 65536:
        return f"master port {port} is not a TCP port (1-65535): set MASTER_PORT or distributed.master_port"
    if world.nodes > 1 and is_loopback(addr):
        fix = ("start every node's torchrun with --rdzv-endpoint=<node 0's address>:PORT and "
               "--local-addr=<that node's own address>" if world.launcher == "torchrun"
               else "set MASTER_ADDR or distributed.master_addr to an address of the first node that the others reach")
        return (f"a {world.nodes}-node job cannot use master address '{addr}': it resolves to this machine's "
                f"loopback, which the other nodes cannot reach; {fix}")
    return None


def init(world: World, device: torch.device, cfg) -> str | None:
    """Apply the communication settings, join the process group; returns the backend, or None for one process.

    cfg is the run's DistributedConfig. A rendezvous that fails or times out (distributed.timeout_s) is one
    line naming the address and port it tried; each node says where it goes before it waits."""
    if not world.distributed:
        return None
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend=nccl needs CUDA devices (this run is on {device.type}): use gloo or auto")
    addr, port, source = rendezvous_address(world, cfg)
    problem = check_master(world, addr, port)
    if problem:
        raise UserError(problem)
    world.master_addr, world.master_port = addr, port
    applied = []
    for name, value in env_settings(cfg).items():
        before = os.environ.get(name)
        os.environ[name] = value
        applied.append(f"{name}={value}" + (f" (was {before})" if before not in (None, value) else ""))
    if torch.cuda.is_available() and backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # torchrun's default, for srun too
        # NCCL's Flight Recorder keeps the last collectives of each rank only when given a buffer: the hang
        # watchdog dumps it next to the stacks (RUN/diagnostics/), where it shows which collective a rank is in.
        if not (os.environ.get("TORCH_FR_BUFFER_SIZE") or os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE")):
            os.environ["TORCH_FR_BUFFER_SIZE"] = os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] = "2000"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    for name, value in (("RANK", world.rank), ("WORLD_SIZE", world.world_size), ("LOCAL_RANK", world.local_rank),
                        ("LOCAL_WORLD_SIZE", world.local_world_size)):
        os.environ.setdefault(name, str(value))
    try:
        socket.getaddrinfo(addr, port)
    except OSError as e:
        raise UserError(f"rendezvous at {addr}:{port}: cannot resolve '{addr}' on this node ({e.strerror or e}); "
                        "set MASTER_ADDR or distributed.master_addr to a name or address every node resolves") from None
    if world.local_rank == 0:  # one line per node: where it waits, so that a hang is never silent
        print(f"rendezvous: node of rank {world.rank}/{world.world_size} joining {addr}:{port} ({source}), "
              f"backend {backend}, timeout {cfg.timeout_s} s"
              + (f"; set from config: {', '.join(applied)}" if applied else ""), flush=True)
    start = time.monotonic()
    # c10d logs every connection retry to stderr with a C++ stack; held back until we know the outcome.
    with _stderr_held() as held:
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                    device_id=device if device.type == "cuda" else None)
            failure = None
        except Exception as e:  # the store's own error does not say where it tried to connect
            failure = e
    if failure is None:
        held.replay()
        from gpt_train import collectives

        collectives.set_storage_group(dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=max(cfg.timeout_s, cfg.storage_timeout_s))))
        return backend
    log = held.keep(f"gpt-train-rendezvous-rank{world.rank}.log")
    raise UserError(f"rendezvous at {addr}:{port} failed for rank {world.rank}/{world.world_size} after "
                    f"{time.monotonic() - start:.0f} s (distributed.timeout_s={cfg.timeout_s}): "
                    f"{type(failure).__name__}: {_first_line(failure)}" + (f" (c10d's log: {log})" if log else ""))


class _Held:
    data = b""

    def replay(self) -> None:
        if self.data:
            os.write(2, self.data)

    def keep(self, name: str) -> str | None:
        if not self.data:
            return None
        path = os.path.join(tempfile.gettempdir(), name)
        with open(path, "wb") as f:
            f.write(self.data)
        return path


@contextlib.contextmanager
def _stderr_held():
    """Send file descriptor 2 (C++ logs included) to a temporary file for the duration; its bytes end up
    in the yielded object's `data`."""
    sys.stderr.flush()
    held = _Held()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.data = tmp.read()


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else "no message"


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean end the ranks wait for each other first: a fast rank tearing
    the group down while a peer still talks was seen to abort the peer. After a failure nobody waits: the
    peers stuck in a collective learn of it when this process's connections close, not at the timeout."""
    from gpt_train import collectives

    if not dist.is_initialized():
        return
    if clean:
        collectives.barrier(storage=True)  # rank 0 may still be waiting for the final checkpoint to land
        collectives.set_storage_group(None)
        dist.destroy_process_group()
        return
    collectives.set_storage_group(None)
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        abort() if abort else dist.destroy_process_group()
    except Exception:  # the group may already be broken: that is why we are here
        pass
