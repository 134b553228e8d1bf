"""Who this process is in the job, whatever launched it (one process, torchrun, srun, submitit).

The launcher's environment is read once into a `World`; the rest of the code asks the World
and never reads RANK or SLURM_* itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt_train.errors import UserError


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "single"  # single | torchrun | srun
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


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as host names, without calling scontrol:
    inside a container `scontrol` is usually missing."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def detect_world(env: dict[str, str] | None = None) -> World:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, submitit's helper, or anything setting the c10d variables
        return World(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
            master_addr=env.get("MASTER_ADDR", ""),
            master_port=int(env.get("MASTER_PORT", 0)),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun, one task per GPU
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost")))
        job = int(env.get("SLURM_JOB_ID", "0"))
        return World(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=int(env["SLURM_NTASKS"]) // nodes,
            launcher="srun",
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            # A port derived from the job id keeps two jobs sharing a node from colliding.
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 20000),
        )
    return World()


def pick_device(requested: str, world: World) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU: {torch.cuda.device_count()} visible on this node")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available on this machine")
    return torch.device(requested)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def init(world: World, device: torch.device, backend: str, timeout_s: int) -> str | None:
    """Join the process group; returns the backend, or None for a single process."""
    if not world.distributed:
        return None
    if world.nodes > 1 and world.master_addr and _is_loopback(world.master_addr):
        raise UserError(f"a {world.nodes}-node job cannot use master address '{world.master_addr}': it resolves to "
                        "this machine's loopback, which other nodes cannot reach")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", world.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(world.master_port or 29500))
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.world_size))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except Exception as e:  # the store's own error does not say where it tried to connect
        raise UserError(f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed for rank "
                        f"{world.rank}/{world.world_size} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return backend


def shutdown(world: World) -> None:
    if dist.is_initialized():
        dist.barrier()  # without it a fast rank tears down the group while a peer still talks: seen to abort here
        dist.destroy_process_group()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: the ranks must agree before they act together."""
    return all_reduce_sum([float(flag)], device)[0] > 0 if dist.is_initialized() else flag


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
