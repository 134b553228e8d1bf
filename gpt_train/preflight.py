"""The start-up check of every node, before the first step: `run` on every rank, then `enforce` on the outcome.

What it proves, in a few seconds:

- the device each rank was given computes: a matmul of small integers (exact in float32, TF32 and bf16 units)
  compared with the CPU's answer, after a synchronize; on CUDA, that the rank's current device is the one it
  claims. A CUDA error is a failed check, not a crash;
- the ranks reach each other through the job's process group: a 1 MiB all-reduce (on the GPUs under NCCL, so
  over the links that training uses), timed, its sum checked;
- each node (its local rank 0) can write, read back and delete a small file in the run directory, timed: a full
  disk, a read-only or missing mount, an unreachable bucket, a lost credential are seen now, not at the first
  checkpoint an hour later.

Then every rank learns every rank's figures (one all-gather), so that all agree whether the job can run; `enforce`
names the failed nodes in the job's node report (protocol.NODE_REPORT_VAR) and raises NodeUnhealthy on every rank:
the trainer exits protocol.EXIT_BAD_NODE, and the batch shell requeues the job without those nodes.

What it cannot prove: that a device holds up for hours (heat, ECC errors to come, memory the small matmul never
touches); the interconnect's bandwidth (1 MiB measures latency more than bandwidth, and one all-reduce does not
load every link of a large job); that the store has room for a checkpoint (a small file fits where a checkpoint
does not). A slow node is not a failed one: the figures are recorded (`summary`), not judged. A rank that never
reaches the check (a node that died, a launcher that did not start it) is the process group's timeout, not a
failed check. A wrong all-reduce sum, when every rank sees it, cannot tell whose link corrupted it: every host
that sees it is reported.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt_train import protocol
from gpt_train.distributed import World
from gpt_train.errors import UserError
from gpt_train.faults import Faults, node_name
from gpt_train.storage import Store

INJECTED = "injected (GPT_TRAIN_FAULT)"
MATMUL_N = 512
MATMUL_REPEAT = 3
ALLREDUCE_BYTES = 1 << 20
ALLREDUCE_REPEAT = 5
PROBE_PREFIX = ".preflight-"  # a file in the run directory itself: a shared folder would race between nodes
PROBE_BYTES = 4096


@dataclass
class Check:
    """One rank's figures."""

    rank: int
    host: str  # faults.node_name(): what the node report names and the batch shell excludes
    ok: bool
    problem: str  # "" when ok; what failed otherwise, "; " between several
    device: str  # e.g. "cuda:1 (NVIDIA H200)"
    device_ms: float  # one matmul (the mean of a few); for a failed check, how long it took to fail
    allreduce_ms: float | None  # one all-reduce (the mean of a few); None alone, or when skipped (see run)
    storage_ms: float | None  # write + read + delete; None on the ranks that do not check storage, or on failure


class NodeUnhealthy(Exception):
    """Nodes failed the start-up check. Not a UserError: neither the config nor the run is at fault, and the same
    job on other nodes can run. `hosts`: host -> why."""

    def __init__(self, message: str, hosts: dict[str, str]):
        super().__init__(message)
        self.hosts = hosts


class _Failed(Exception):
    """A check's own finding (a wrong answer), as opposed to an error raised by what it exercised."""


def run(world: World, device: torch.device, store: Store, faults: Faults, timeout_s: float = 60.0) -> list[Check]:
    """Check this rank; every rank's Check, by rank, the same list on every rank. Every rank must call it.

    The device and storage checks run in a daemon thread and fail after timeout_s: a hung GPU or mount cannot be
    interrupted from Python, but the rank still reaches the collectives, so its peers learn of it instead of
    waiting for the process group's timeout. The agreement (and, under NCCL, whether to run the all-reduce at
    all) travels over a gloo group of its own, on the CPU: a rank whose GPU failed can still take part in it.
    Under NCCL the all-reduce needs every rank's GPU, so when any device failed no rank runs it (allreduce_ms is
    None everywhere; the device's problem says why); under any other backend it runs on CPU tensors."""
    host = node_name()
    problems: list[str] = []
    claim = _claim_problem(device)
    device_ms, why, elapsed_ms = _within(timeout_s, lambda: _matmul_ms(device))
    problems += [f"device {device}: {p}" for p in (claim, why) if p]
    device_ok = not problems
    storage_ms = None
    if world.local_rank == 0:
        storage_ms, why, _ = _within(timeout_s, lambda: _storage_ms(store, host))
        problems += [f"storage: {why}"] if why else []
    if faults.fails_preflight():
        problems.append(INJECTED)

    def verdict(allreduce_ms: float | None) -> Check:
        return Check(rank=world.rank, host=host, ok=not problems, problem="; ".join(problems),
                     device=_describe(device), device_ms=device_ms if device_ms is not None else round(elapsed_ms, 3),
                     allreduce_ms=allreduce_ms, storage_ms=storage_ms)

    if not dist.is_initialized():
        return [verdict(None)]
    # A peer arrives after at most its two bounded checks; a new group's default timeout is 30 minutes.
    agree = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2 * timeout_s + 60))
    try:
        allreduce_ms = None
        on_gpus = "nccl" in dist.get_backend()
        if not on_gpus or _everyone(device_ok, agree):
            allreduce_ms, why = _allreduce_ms(device if on_gpus else torch.device("cpu"))
            problems += [why] if why else []
        gathered: list = [None] * dist.get_world_size()
        # Plain dicts: unpickling them imports nothing.
        dist.all_gather_object(gathered, dataclasses.asdict(verdict(allreduce_ms)), group=agree)
    finally:
        dist.destroy_process_group(agree)
    return sorted((Check(**c) for c in gathered), key=lambda c: c.rank)


def failed_hosts(checks: list[Check]) -> dict[str, str]:
    """host -> why, for every host with a failed rank, in rank order; ranks with the same problem share a clause."""
    by_host: dict[str, dict[str, list[int]]] = {}
    for c in checks:
        if not c.ok:
            by_host.setdefault(c.host, {}).setdefault(c.problem, []).append(c.rank)
    return {host: "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {problem}"
                            for problem, ranks in problems.items())
            for host, problems in by_host.items()}


def summary(checks: list[Check]) -> dict:
    """The figures per host, JSON-able, for the run's events.jsonl."""
    hosts = {}
    for host in dict.fromkeys(c.host for c in checks):
        mine = [c for c in checks if c.host == host]
        hosts[host] = {"ok": all(c.ok for c in mine), "ranks": [c.rank for c in mine],
                       "devices": sorted({c.device for c in mine}),
                       "device_ms_max": max(c.device_ms for c in mine),
                       "allreduce_ms": _span(c.allreduce_ms for c in mine),
                       "storage_ms": _span(c.storage_ms for c in mine),
                       "problem": failed_hosts(mine).get(host, "")}
    return {"ok": all(c.ok for c in checks), "ranks": len(checks), "hosts": hosts,
            "allreduce_ms": _span(c.allreduce_ms for c in checks)}


def enforce(checks: list[Check], say: Callable[[str], object], rank: int | None = None) -> None:
    """Say what was measured; when a check failed, name the failed hosts in the node report and raise
    NodeUnhealthy (on every rank: they all hold the same checks). `say` prints on rank 0 only (the trainer's);
    rank: this process's, by default its rank in the process group (0 alone).

    Rank 0 alone writes the report, once per failed host: it holds every rank's checks, the report is one file
    on a shared file system whose appends from several machines (NFS) are not atomic, and a failed node may be
    one that cannot write there at all."""
    say(measured(checks))
    bad = failed_hosts(checks)
    if not bad:
        return
    message = (f"preflight failed on {len(bad)} of {len({c.host for c in checks})} host(s): "
               + "; ".join(f"{host} ({why})" for host, why in bad.items()))
    note = ""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        try:
            for host, why in bad.items():
                path = protocol.report_bad_node(host, why)
            note = (f"; named in {path}, so that the requeued job leaves them out" if path else
                    f"; {protocol.NODE_REPORT_VAR} is not set: nothing tells the launcher to leave them out")
        except OSError as e:
            note = f"; could not write the node report ({e})"
    say(message + note)
    raise NodeUnhealthy(message, bad)


def measured(checks: list[Check]) -> str:
    """One line: how many ranks and hosts, whether they passed, the slowest figures."""
    hosts = len({c.host for c in checks})
    failed = len(failed_hosts(checks))
    devices = ", ".join(sorted({re.sub(r":\d+", "", c.device) for c in checks}))
    parts = [f"matmul on {devices} {max(c.device_ms for c in checks):.3g} ms"]
    allreduce = _span(c.allreduce_ms for c in checks)
    if allreduce:
        parts.append(f"all-reduce of {ALLREDUCE_BYTES >> 20} MiB {allreduce['min']:.3g}-{allreduce['max']:.3g} ms")
    elif len(checks) > 1:
        parts.append("all-reduce not run")
    storage = _span(c.storage_ms for c in checks)
    if storage:
        parts.append(f"run_dir write/read/delete {storage['max']:.3g} ms")
    verdict = "ok" if not failed else f"FAILED on {failed} host(s)"
    return f"preflight: {len(checks)} rank(s) on {hosts} host(s) {verdict}: " + ", ".join(parts)


# -- the checks --------------------------------------------------------------------------------------------

def _within(timeout_s: float, work: Callable[[], float]) -> tuple[float | None, str | None, float]:
    """(work's result, None) or (None, why it failed as one line), and the milliseconds it took; work that
    outlives timeout_s is a failure, left to run on in a daemon thread, which does not keep the process alive."""
    box: list[tuple[float | None, str | None]] = []

    def target() -> None:
        try:
            box.append((work(), None))
        except Exception as e:  # whatever the device or the store raises is the finding
            box.append((None, _one_line(e)))

    start = time.perf_counter()
    thread = threading.Thread(target=target, name="gpt-train-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    if not box:
        return None, f"no answer within {timeout_s:g} s", elapsed_ms
    return box[0][0], box[0][1], elapsed_ms


def _claim_problem(device: torch.device) -> str | None:
    """On the calling thread, since the current CUDA device is per thread (pick_device set it on this one)."""
    if device.type != "cuda" or device.index is None:
        return None
    try:
        current = torch.cuda.current_device()
    except Exception as e:  # CUDA cannot even say: the device is unusable
        return _one_line(e)
    return None if current == device.index else f"the rank claims it, but its current CUDA device is cuda:{current}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _matmul_ms(device: torch.device) -> float:
    # Integers 0..6: every product and partial sum is an integer below 2**24, so any matmul unit that is right
    # gives exactly the CPU's answer.
    a_cpu = (torch.arange(MATMUL_N * MATMUL_N, dtype=torch.float32) % 7).reshape(MATMUL_N, MATMUL_N)
    expected = a_cpu @ a_cpu
    a = a_cpu.to(device)
    torch.mm(a, a)  # the first call pays for library handles and kernel loading: not what is timed
    _sync(device)
    start = time.perf_counter()
    for _ in range(MATMUL_REPEAT):
        product = a @ a
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3 / MATMUL_REPEAT
    if device.index is not None and product.device != device:
        raise _Failed(f"the matmul ran on {product.device}")
    wrong = int((product.cpu() != expected).sum())
    if wrong:
        raise _Failed(f"a {MATMUL_N}x{MATMUL_N} matmul got {wrong} of {MATMUL_N * MATMUL_N} entries wrong")
    return round(ms, 3)


def _allreduce_ms(device: torch.device) -> tuple[float | None, str | None]:
    """(ms per all-reduce, problem) on the default process group; a problem is a failed check, not a crash."""
    ranks, rank = dist.get_world_size(), dist.get_rank()
    # A small integer per rank, not rank itself: the sum stays exact in float32 for any number of ranks.
    expected = float(sum(r % 7 + 1 for r in range(ranks)))
    try:
        t = torch.empty(ALLREDUCE_BYTES // 4, dtype=torch.float32, device=device)
        t.fill_(rank % 7 + 1)
        dist.all_reduce(t)  # the first one connects and waits for the last rank to arrive: not what is timed
        _sync(device)
        start = time.perf_counter()
        for _ in range(ALLREDUCE_REPEAT):
            t.fill_(rank % 7 + 1)
            dist.all_reduce(t)
        _sync(device)
        ms = round((time.perf_counter() - start) * 1e3 / ALLREDUCE_REPEAT, 3)
        wrong = int((t != expected).sum())
    except Exception as e:  # a broken link or a device error: this rank's finding
        return None, f"all-reduce: {_one_line(e)}"
    if wrong:
        return ms, f"all-reduce: {wrong} of {t.numel()} sums are not {expected:g}"
    return ms, None


def _everyone(flag: bool, group) -> bool:
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t, group=group)
    return int(t) == 0


def _storage_ms(store: Store, host: str) -> float:
    rel = f"{PROBE_PREFIX}{host}-{os.getpid()}"
    data = os.urandom(PROBE_BYTES)
    start = time.perf_counter()
    store.write_bytes(rel, data)
    try:
        back = store.read_bytes(rel)
    finally:
        store.remove(rel)
    ms = round((time.perf_counter() - start) * 1e3, 3)
    if back != data:
        raise _Failed(f"{store.url}/{rel}: read back {len(back)} bytes that differ from the {len(data)} written")
    return ms


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # the device check says what is wrong with it
        return str(device)


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0][:300] if lines else "no message"
    return text if isinstance(e, (_Failed, UserError)) else f"{type(e).__name__}: {text}"


def _span(values: Iterable[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    return {"min": min(known), "max": max(known)} if known else None
