"""Collectives of plain values (floats, flags, small objects) that the trainer's ranks use to agree.

Each is a no-op for one process, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

# A gloo group with distributed.storage_timeout_s, for the waits on rank 0's storage work (the lease, reading and
# verifying the resume checkpoint, the final upload): slow storage is not a dead peer, and under the collective
# timeout it would kill the job. Set by distributed.init; None for one process.
_storage_group = None


def set_storage_group(group) -> None:
    global _storage_group
    _storage_group = group


def storage_group():
    return _storage_group


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


def barrier(storage: bool = False) -> None:
    if dist.is_initialized():
        dist.barrier(group=_storage_group if storage else None)


def _pack(obj) -> bytes:
    # torch.save, not plain pickle: torch 2.13's *_object collectives fail to unpickle CPU tensors (such as
    # RNG states) with "UntypedStorage has no attribute 'dtype'"; bytes travel fine.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def all_gather_object(obj, storage: bool = False):
    """storage: the ranks may wait on rank 0's storage work here (the storage group's timeout)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, _pack(obj), group=_storage_group if storage else None)
    return [_unpack(b) for b in out]


def broadcast_object(obj, storage: bool = False):
    """storage: the ranks may wait on rank 0's storage work here (the storage group's timeout)."""
    if not dist.is_initialized():
        return obj
    box = [_pack(obj)]
    dist.broadcast_object_list(box, src=0, group=_storage_group if storage else None)
    return _unpack(box[0])


class PendingSum:
    """A sum over the ranks of a few flags, started now and read later (a step later), so that the step does
    not wait for it. On CUDA the result is copied to pinned host memory behind the all-reduce and read
    through an event: reading it waits for the all-reduce, not for the kernels queued since."""

    def __init__(self, values: list[float], device: torch.device):
        self.local = values
        if not dist.is_initialized():
            return
        self.tensor = torch.tensor(values, dtype=torch.float32, device=device)
        self.work = dist.all_reduce(self.tensor, async_op=True)
        self.event = None
        if device.type == "cuda":
            self.work.wait()  # on CUDA: makes the stream wait, not this thread
            self.host = torch.empty(len(values), dtype=torch.float32, pin_memory=True)
            self.host.copy_(self.tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> list[float]:
        if not dist.is_initialized():
            return self.local
        if self.event is not None:
            self.event.synchronize()
            return self.host.tolist()
        self.work.wait()
        return self.tensor.tolist()
