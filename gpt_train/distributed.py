"""Who this process is in the job, whatever launched it (one process, torchrun, srun, submitit), and the
process group it joins and leaves.

The launcher's environment is read once into a `World`; the rest of the code asks the World
and never reads RANK or SLURM_* itself. How the model is spread over the ranks is `parallel.py`;
the collectives the trainer's ranks agree with are `collectives.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
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


def pick_device(requested: str, world: World) -> torch.device:
    """One device per local rank. A task that sees a single GPU (srun --gpus-per-task=1, or a GPU binding
    that sets CUDA_VISIBLE_DEVICES per task) uses it whatever its local rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        count = torch.cuda.device_count()
        index = 0 if count == 1 else world.local_rank
        if index >= count:
            raise UserError(f"local rank {world.local_rank} has no GPU: {count} visible on this node "
                            f"for {world.local_world_size} local rank(s)")
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
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
        dist.destroy_process_group()
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        abort() if abort else dist.destroy_process_group()
    except Exception:  # the group may already be broken: that is why we are here
        pass
