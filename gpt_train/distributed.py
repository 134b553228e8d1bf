"""Who this process is in the job, whatever launched it (one process, torchrun, srun, submitit), and the
PyTorch distributed pieces the trainer uses: the process group, DDP or FSDP2, full-state checkpoints.

The launcher's environment is read once into a `World`; the rest of the code asks the World
and never reads RANK or SLURM_* itself.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "submitit" if "SUBMITIT_EXECUTOR" in env else "env",
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
    out = {}
    if cfg.socket_ifname:
        out["NCCL_SOCKET_IFNAME"] = cfg.socket_ifname
        if not cfg.socket_ifname.startswith(("^", "=")):  # gloo takes plain interface names only
            out["GLOO_SOCKET_IFNAME"] = cfg.socket_ifname
    if cfg.ib != "auto":
        out["NCCL_IB_DISABLE"] = "0" if cfg.ib == "on" else "1"
    if cfg.nccl_debug:
        out["NCCL_DEBUG"] = cfg.nccl_debug
    if cfg.async_error_handling != "auto":
        out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = cfg.async_error_handling
    return out


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


def shutdown(world: World) -> None:
    if dist.is_initialized():
        dist.barrier()  # without it a fast rank tears down the group while a peer still talks: seen to abort here
        dist.destroy_process_group()


# -- DDP or FSDP ----------------------------------------------------------------------------------

def wrap(model: torch.nn.Module, world: World, device: torch.device, cfg) -> torch.nn.Module:
    """The module the training step calls: DDP, or FSDP2 (`fully_shard` on each transformer block, then the
    root), or the model itself for one process. cfg is the run's Config.

    FSDP2 shards the model in place, so the plain module (and `torch.compile`'s wrapper around it) becomes
    the sharded one: build the optimizer from its parameters after this call. Either way the result has
    `no_sync()`: DDP skips the gradient all-reduce inside it; FSDP reduce-scatters on every micro-step
    anyway, so that gradients stay sharded (skipping it would hold the whole model's gradients unsharded,
    the memory FSDP is there to save)."""
    if not world.distributed:
        return model
    if cfg.distributed.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from gpt_train import precision
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if precision.choose(cfg.train.precision, device) == "fp16":
        raise ConfigError("distributed.strategy=fsdp does not support train.precision=fp16 (its loss scaler would "
                          "see only this rank's shard of the gradients): use bf16 or fp32, or strategy=ddp")
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper compiles lazily: shard what it wraps
    mesh = init_device_mesh(device.type, (world.world_size,))
    for block in inner.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(inner, mesh=mesh, reshard_after_forward=False)  # the root's parameters are used again at once
    inner.no_sync = contextlib.nullcontext
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every rank enters; inside, any one rank may run the model's forward alone (sampling on rank 0).
    FSDP: all-gathers every shard on entry and keeps the full parameters until exit. Others: nothing."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    units = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # back to wrap()'s settings
            unit.set_reshard_after_forward(unit is not inner, recurse=False)
            unit.reshard()


# -- full-state checkpoints, the same for one process, DDP and FSDP -------------------------------------

TIED = "lm_head.weight"  # the same matrix as transformer.wte.weight: stored once


def _options(model: torch.nn.Module, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers shard by shard into rank 0's host memory; the other ranks get {}. Without FSDP
    # the tensors stay where they are and the checkpointer copies them to pinned memory asynchronously.
    return StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model), **kw)


def model_state(model: torch.nn.Module) -> dict:
    """Full weights with plain names (no `module.` or `_orig_mod.`). Every rank must call it (FSDP gathers);
    only rank 0's result is complete."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(getattr(model, "_orig_mod", model), options=_options(model))
    return {k: v for k, v in state.items() if k != TIED}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name (`transformer.h.0.mlp.c_fc.weight`), param_groups
    listing names: it loads under any strategy and world size. Every rank must call it; rank 0's is complete."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(getattr(model, "_orig_mod", model), optimizer, options=_options(model))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (every rank passes the whole of it) into this strategy's optimizer.
    State saved by `optimizer.state_dict()` (integer ids, before names were used) is converted first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(model, "_orig_mod", model)
    state = _by_name(inner, optimizer, state)
    set_optimizer_state_dict(inner, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    ids = [p for g in state.get("param_groups", []) for p in g["params"]]
    if not ids or not all(isinstance(p, int) for p in ids):
        return state
    names = {id(p): n for n, p in model.named_parameters()}  # the first name of a tied parameter
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != len(ids):
        raise UserError(f"the checkpoint's optimizer holds {len(ids)} parameters, this model {len(order)}")
    name_of = dict(zip(ids, order))
    return {
        "state": {name_of[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]],
    }


# -- collectives of plain values --------------------------------------------------------------------

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


def _pack(obj) -> bytes:
    # torch.save, not plain pickle: torch 2.13's *_object collectives fail to unpickle CPU tensors (such as
    # RNG states) with "UntypedStorage has no attribute 'dtype'"; bytes travel fine.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, _pack(obj))
    return [_unpack(b) for b in out]


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [_pack(obj)]
    dist.broadcast_object_list(box, src=0)
    return _unpack(box[0])
