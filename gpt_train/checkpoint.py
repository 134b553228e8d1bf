"""Checkpoints that are never half-written, on any fsspec storage, saved without stalling training.

    RUN/checkpoints/step-00001200/
        model.pt        weights, plain names (no DDP `module.` or compile `_orig_mod.` prefixes)
        optimizer.pt    AdamW state (and the fp16 GradScaler's)
        rng.pt          RNG states of every rank
        meta.json       step, tokens, loader position, val loss, config, tokenizer, versions, run id
        MANIFEST.json   size and sha256 of each file above; written last
    RUN/checkpoints/LATEST   the newest step folder's name; written after its manifest

A folder without a verifying manifest does not exist as far as resume is concerned: a writer
killed at any moment leaves at worst an ignored folder, which the next writer removes.

A save copies the state into host memory (kept for the next save up to checkpoint.host_buffer_gb, see
_Staging) and then serializes each file straight into the store, hashing it on the way: no file is ever
whole in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import torch

from gpt_train import rundir
from gpt_train.errors import CheckpointError, StorageError
from gpt_train.rundir import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    META,
    list_steps,
    manifested_steps,
    read_meta,
    step_folder,
    step_name,
)
from gpt_train.storage import Store

# Parts with a file of their own (PART.pt); every other part's state_dict() is merged into meta.json.
FILE_PARTS = ("model", "optimizer", "rng")
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


class _PinnedPages(mmap.mmap):
    """Anonymous pages registered with CUDA (page-locked), unregistered when the last tensor on them goes."""

    ptr: int | None = None  # set once registered
    device: int = 0

    def __del__(self):
        # Before the pages are unmapped. On the GPU of the copy: a CUDA call on a thread that never chose one
        # would start a context on GPU 0. The result is not checked: at interpreter exit CUDA may already be
        # gone, and the pages go back to the system with the mapping either way.
        if self.ptr is not None:
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(self.ptr)


def _host_empty(shape: torch.Size, dtype: torch.dtype, pinned_for: torch.device | None = None) -> torch.Tensor:
    """An uninitialized host tensor on pages of its own, of exactly its size (to the page); page-locked for
    copies from the GPU `pinned_for`.

    Own pages, not an allocator's: the caching host allocator behind `pin_memory=True` rounds every block up
    to a power of two and keeps freed blocks for reuse, and glibc keeps freed memory for the next malloc when
    train.py asks it to (precision.reuse_freed_memory). A mapping goes back to the system when its tensor
    goes, which is what a budget of host memory needs. RuntimeError when CUDA refuses to pin."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    pages = (_PinnedPages if pinned_for is not None else mmap.mmap)(-1, nbytes)
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    if pinned_for is not None:
        cudart = torch.cuda.cudart()
        with torch.cuda.device(pinned_for):
            result = cudart.cudaHostRegister(flat.data_ptr(), nbytes, 1)  # cudaHostRegisterPortable: every context's
        if result != cudart.cudaError.success:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes: {cudart.cudaGetErrorString(result)}")
        pages.ptr, pages.device = flat.data_ptr(), pinned_for.index  # a tensor's device always has its index
    return flat.view(dtype).view(shape)


class _Staging:
    """Host copies of the state a checkpoint writes, so training may change the originals at once.

    Copies of up to `budget_bytes` are kept for the next save and overwritten in place there, because
    touching gigabytes of freshly allocated pages costs more than the copy itself; those of tensors on a
    GPU are pinned, so that their copy runs at full speed and asynchronously. Past the budget a copy is
    made into plain (pageable) pages and freed once the checkpoint is written. That costs time where
    training waits (the GPU copies into pageable memory through the driver's own small pinned buffers,
    synchronously and slower, and the pages fault in on the way) but no host memory between saves. Copying
    only as much as a fixed pinned buffer holds and writing it before copying more would bound the memory of
    a save too, but training would then wait for the whole write: the next step changes the originals."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.kept: Any = None  # the buffers kept from the last snapshot, in its shape (None where not kept)
        self.pin_error: str | None = None  # why CUDA refused to pin, once it has: copies are pageable from then on

    def snapshot(self, obj: Any) -> Any:
        self._room = self.budget
        copy, self.kept = self._copy(obj, self.kept)
        return copy

    def _copy(self, obj: Any, reuse: Any) -> tuple[Any, Any]:
        """(the copy of obj, the part of it to keep)."""
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            nbytes = src.numel() * src.element_size()
            keep = nbytes <= self._room
            if not keep:
                return _host_empty(src.shape, src.dtype).copy_(src), None
            self._room -= nbytes
            fits = isinstance(reuse, torch.Tensor) and reuse.shape == src.shape and reuse.dtype == src.dtype
            dst = reuse if fits else self._new(src)
            dst.copy_(src, non_blocking=True)
            return dst, dst
        if isinstance(obj, dict):
            reuse = reuse if isinstance(reuse, dict) else {}
            pairs = {k: self._copy(v, reuse.get(k)) for k, v in obj.items()}
            return {k: c for k, (c, _) in pairs.items()}, {k: kept for k, (_, kept) in pairs.items()}
        if isinstance(obj, (list, tuple)):
            reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
            pairs = [self._copy(v, r) for v, r in zip(obj, reuse)]
            return type(obj)(c for c, _ in pairs), [kept for _, kept in pairs]
        return obj, None

    def _new(self, src: torch.Tensor) -> torch.Tensor:
        if src.device.type == "cuda" and self.pin_error is None:
            try:
                return _host_empty(src.shape, src.dtype, pinned_for=src.device)
            except RuntimeError as e:
                self.pin_error = str(e)
        return _host_empty(src.shape, src.dtype)


class _HashingFile:
    """A write-only file object that hashes and counts what goes through it, passing it on in pieces: a
    buffered upload copies what it is given into its buffer, and torch.save writes each tensor in one call.

    `error` is the first exception the file raised: torch.save reports a failed write as an error of its own
    ("unexpected pos"), which says nothing of a full disk."""

    PIECE = 8 << 20

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0
        self.error: Exception | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            for i in range(0, len(view), self.PIECE):
                piece = view[i:i + self.PIECE]
                self.sha256.update(piece)
                self.f.write(piece)
        except Exception as e:
            # kept without its traceback, whose frames (torch.save's) hold the copy being written
            self.error = self.error or e.with_traceback(None)
            raise
        self.bytes += len(view)
        return len(view)

    def flush(self) -> None:
        self.f.flush()


# What each file must unpickle into for training to restore it. weights_only admits any nesting of tensors
# and plain containers, so a file whose manifest was rewritten to match it can hold anything of that kind.
_CONTENTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a dict of parameter names to tensors", lambda o: isinstance(o, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in o.items())),
    "optimizer": ("a dict with the optimizer's state",
                  lambda o: isinstance(o, dict) and isinstance(o.get("optimizer"), dict)),
    "rng": ("a list of each rank's generator states",
            lambda o: isinstance(o, list) and all(isinstance(r, dict) for r in o)),
}


def _deserialize(data: bytes, what: str, part: str) -> Any:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message for a refused object advises loading with weights_only=False, which runs the file's
        # code: no advice to pass on about a file gpt-train did not write. Its other messages say what broke.
        text = str(e)
        detail = f": {text.splitlines()[0][:200]}" if text and "weights_only" not in text else ""
        raise CheckpointError(f"{what} is not a gpt-train checkpoint file, or holds objects gpt-train does not load; "
                              f"nothing in it was executed ({type(e).__name__}{detail})") from None
    expected, fits = _CONTENTS[part]
    if not fits(obj):
        raise CheckpointError(f"{what} holds a {type(obj).__name__}, not {expected}: not a gpt-train checkpoint file")
    return obj


@dataclass
class Checkpoint:
    """A loaded and verified checkpoint."""

    url: str
    meta: dict
    model: dict
    optimizer: dict | None
    rng: list | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load(url: str, parts: tuple[str, ...] = FILE_PARTS, verify: bool = True) -> Checkpoint:
    """Read a checkpoint folder, verifying every file against the manifest before unpickling-free loading.
    verify=False: only the sizes are checked, for a folder another rank has just verified byte for byte."""
    store = Store(url)
    manifest = rundir.read_manifest(store)
    unlisted = [f"{p}.pt" for p in parts if f"{p}.pt" not in manifest["files"]]
    if unlisted:
        raise CheckpointError(f"'{url}/{MANIFEST}' does not list {', '.join(unlisted)}: not a complete checkpoint")
    read = rundir.read_verified if verify else rundir.read_sized
    blobs = {p: read(store, manifest, f"{p}.pt") for p in parts}
    meta = rundir.read_verified_meta(store, manifest)
    get = lambda part: _deserialize(blobs[part], f"'{url}/{part}.pt'", part) if part in blobs else None
    return Checkpoint(url=url, meta=meta, model=get("model"), optimizer=get("optimizer"), rng=get("rng"))


def check_compatible(ckpt_meta: dict, model_cfg: dict, tokenizer: dict, source: str) -> None:
    """A checkpoint of another model or tokenizer is an error before any step runs, not a shape crash."""
    theirs = ckpt_meta["config"]["model"]
    diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, config {model_cfg.get(k)!r}"
             for k in SHAPE_KEYS if theirs.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint '{source}' is of another model: " + "; ".join(diffs))
    ours = ckpt_meta.get("tokenizer", {})
    if ours.get("sha256") != tokenizer.get("sha256"):
        raise CheckpointError(f"checkpoint '{source}' was trained with tokenizer {ours.get('name')!r} "
                              f"(sha256 {str(ours.get('sha256'))[:12]}), the data uses {tokenizer.get('name')!r} "
                              f"(sha256 {str(tokenizer.get('sha256'))[:12]})")


class Checkpointer:
    """Writes checkpoints of one run from rank 0 on a background thread; one in flight at a time."""

    def __init__(self, run_url: str, keep_last: int, keep_best: bool, asynchronous: bool = True,
                 retries: int = 3, log: Callable[[str], None] = print, host_budget_bytes: int = 8 * 10**9):
        """host_budget_bytes: host memory kept between saves for the copy of the state (pinned where the state
        is on a GPU); what does not fit is copied into memory freed after each write (see _Staging). The
        default is checkpoint.host_buffer_gb's."""
        self.store = Store(run_url)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.asynchronous, self.retries, self.log = asynchronous, retries, log
        self._thread: threading.Thread | None = None
        self._staging = _Staging(host_budget_bytes)
        self.last_saved: int | None = None
        self.last_error: str | None = None

    # -- finding a checkpoint to resume from -------------------------------------------------

    def manifested_steps(self) -> list[int]:
        return manifested_steps(self.store)

    def load_newest(self, parts: tuple[str, ...] = FILE_PARTS) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped, never loaded."""
        for step in reversed(self.manifested_steps()):
            url = f"{self.store.url}/{step_folder(step)}"
            try:
                return load(url, parts)
            except CheckpointError as e:
                self.log(f"checkpoint: skipping {step_name(step)}: {e}")
        return None

    def load_step(self, step: int, parts: tuple[str, ...] = FILE_PARTS) -> Checkpoint:
        """The checkpoint of `step`, chosen by name: one that is missing is an error that lists the run's, and
        one that does not verify is an error too, not skipped for another."""
        steps = self.manifested_steps()
        if step not in steps:
            have = ", ".join(map(str, steps[-8:])) if steps else "none"
            aside = (" (it is in rolled-back/: move it back into checkpoints/ to return to that branch)"
                     if self.store.exists(f"{rundir.ROLLED_BACK}/{step_name(step)}") else "")
            raise CheckpointError(f"'{self.store.url}' has no checkpoint of step {step}{aside}; its checkpoints: "
                                  f"{have}")
        return load(f"{self.store.url}/{step_folder(step)}", parts)

    def load_best(self, parts: tuple[str, ...] = FILE_PARTS) -> Checkpoint | None:
        """The checkpoint of the lowest val loss among those that load; the others are reported and skipped.

        Only meta.json (verified) is read of every checkpoint; the best is then loaded whole, because a val
        loss is no reason to trust the weights next to it."""
        scored = []
        for step in self.manifested_steps():
            folder = Store(f"{self.store.url}/{step_folder(step)}")
            try:
                val_loss = rundir.read_verified_meta(folder, rundir.read_manifest(folder)).get("val_loss")
            except CheckpointError as e:
                self.log(f"checkpoint: skipping {step_name(step)}: {e}")
                continue
            if isinstance(val_loss, (int, float)):
                scored.append((val_loss, step))
        for _, step in sorted(scored):
            try:
                return load(f"{self.store.url}/{step_folder(step)}", parts)
            except CheckpointError as e:
                self.log(f"checkpoint: skipping {step_name(step)}: {e}")
        return None

    # -- writing -------------------------------------------------------------------------------

    def save(self, step: int, model: dict, optimizer: dict, rng: list, meta: dict) -> None:
        """Snapshot to host memory now, write in the background."""
        self.wait()  # the previous write is done with the staging buffers
        pin_error = self._staging.pin_error
        copies = dict(zip(("model.pt", "optimizer.pt"), self._staging.snapshot((model, optimizer))))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies above are asynchronous
        if self._staging.pin_error != pin_error:
            self.log(f"checkpoint: host memory could not be pinned ({self._staging.pin_error}): copies of the "
                     "state go through pageable memory, which blocks training longer")
        args = (step, copies, rng, meta)
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write_with_retries, args=args, name="checkpoint-writer", daemon=False)
            self._thread.start()
        else:
            self._write_with_retries(*args)

    def wait(self) -> bool:
        """Wait for the checkpoint in flight; True when the last save landed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.last_error is None

    def _write_with_retries(self, step: int, copies: dict, rng: list, meta: dict) -> None:
        """`copies` (file name: the host copy it holds) is emptied once the write is over, and no frame binds
        a copy to a name of its own: frames can outlive their call in a reference cycle that only the cyclic
        collector frees, which may run much later (an exception a library caught and kept: fsspec's sync()
        keeps the one it raises in a local), and a frame holds its callers'. Copies past the host budget are
        then freed when their write ends."""
        try:
            self._write_attempts(step, copies, rng, meta)
        finally:
            copies.clear()

    def _write_attempts(self, step: int, copies: dict, rng: list, meta: dict) -> None:
        for attempt in range(1, self.retries + 1):
            try:
                self._write(step, copies, rng, meta)
                self.last_saved, self.last_error = step, None
                self._prune()
                return
            except Exception as e:  # storage errors of every library: retry, then report and go on
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(30.0, 2.0 ** attempt))
        self.log(f"checkpoint: FAILED to write {step_name(step)} after {self.retries} attempts: {self.last_error}. "
                 "Training goes on; the last good checkpoint is "
                 + (step_name(self.last_saved) if self.last_saved is not None else "none yet"))

    def _write(self, step: int, copies: dict, rng: list, meta: dict) -> None:
        folder = step_folder(step)
        self.store.remove(f"{folder}/{MANIFEST}")  # an older, different checkpoint of the same step stops existing first
        meta_json = json.dumps(meta, indent=2, sort_keys=True).encode()
        writers = {
            "model.pt": lambda f: torch.save(copies["model.pt"], f),
            "optimizer.pt": lambda f: torch.save(copies["optimizer.pt"], f),
            "rng.pt": lambda f: torch.save(rng, f),
            META: lambda f: f.write(meta_json),
        }
        files = {}
        for name, write in writers.items():
            # Serialized straight into the store, hashed on the way: no file is ever whole in memory.
            with self.store.open_write(f"{folder}/{name}") as f:
                out = _HashingFile(f)
                try:
                    write(out)
                except Exception:
                    if out.error is None:
                        raise
                if out.error is not None:
                    raise out.error  # outside the except clause: not chained to torch's message about it
            files[name] = {"bytes": out.bytes, "sha256": out.sha256.hexdigest()}
        manifest = {
            "format": rundir.FORMAT,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        self.store.write_text(f"{folder}/{MANIFEST}", json.dumps(manifest, indent=2))
        self.store.write_text(LATEST, step_name(step) + "\n")
        total = sum(e["bytes"] for e in files.values())
        self.log(f"checkpoint: saved {self.store.url}/{folder} ({total / 1e6:.1f} MB)")

    def _prune(self) -> None:
        """Keep the newest keep_last, the best by val loss and final ones; drop the rest and leftovers."""
        try:
            steps = list_steps(self.store)
            valid = [s for s, complete in steps if complete]
            keep = set(valid[-self.keep_last:])
            metas = {s: read_meta(self.store, s) for s in valid}
            keep |= {s for s, m in metas.items() if m.get("final")}
            scored = [(m["val_loss"], s) for s, m in metas.items() if m.get("val_loss") is not None]
            if self.keep_best and scored:
                keep.add(min(scored)[1])
            for step, complete in steps:
                if step in keep:
                    continue
                folder = step_folder(step)
                if complete:
                    self.store.remove(f"{folder}/{MANIFEST}")  # invalid first, so a half-deleted folder is never loaded
                self.store.remove(folder)
        except (StorageError, OSError, ValueError) as e:
            self.log(f"checkpoint: pruning old checkpoints failed ({e}); they stay until the next save")
def find(source: str, parts: tuple[str, ...] = ("model",), which: str = "newest") -> Checkpoint:
    """A checkpoint folder, or a run directory's checkpoint: its newest valid one, the one of the lowest val
    loss (which="best"), or that of a step (which="1200")."""
    if Store(source).exists(MANIFEST):
        if which != "newest":
            raise CheckpointError(f"'{source}' is a checkpoint folder: --checkpoint {which} chooses among the "
                                  "checkpoints of a run directory")
        return load(source, parts)
    run = Checkpointer(source, keep_last=1, keep_best=False)
    if which.isdigit():
        return run.load_step(int(which), parts)
    if which not in ("newest", "best"):
        raise CheckpointError(f"--checkpoint {which!r}: give newest, best or a step number")
    found = run.load_best(parts) if which == "best" else run.load_newest(parts)
    if found is None:
        what = "with a val loss" if which == "best" else "valid"
        raise CheckpointError(f"no {what} checkpoint in '{source}' (expected a run directory or a checkpoint folder)")
    return found


def _leaf(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# -- the checkpoints of a training run ------------------------------------------------------------

class CheckpointManager:
    """The checkpoints of one run: where a start resumes from, when to save, and what a checkpoint holds.

    `parts` are the run's stateful objects (state_dict / load_state_dict): `model` (model.pt), `optimizer`
    (optimizer.pt), `rng` (this rank's generators; rng.pt holds every rank's) and any others, whose states
    are merged into meta.json (the step counters, the loader's position). `about` describes the run (config,
    tokenizer, versions) and goes into meta.json unchanged. Every rank calls every method; rank 0 writes.
    """

    def __init__(self, cfg, run_dir: str, world, about: dict, log: Callable[[str], None] = print):
        self.cfg, self.world, self.about, self.log = cfg, world, about, log
        self.writer = Checkpointer(run_dir, cfg.keep_last, cfg.keep_best, asynchronous=cfg.async_save, log=log,
                                   host_budget_bytes=int(cfg.host_buffer_gb * 1e9))
        self.parts: dict[str, Any] = {}
        self.rollback: dict | None = None  # what a resume=best or resume=STEP start set aside, for the events log
        self.course_changes: list[str] = []  # exactness given up with checkpoint.allow_changes, for the events log
        self._last_save = time.monotonic()

    def attach(self, **parts: Any) -> None:
        self.parts.update(parts)

    # -- where a start begins ------------------------------------------------------------------

    def resume_point(self) -> tuple[Checkpoint | None, Checkpoint | None, str]:
        """(own checkpoint to resume, checkpoint to take only the weights from, what to print). Rank 0
        chooses, so that every rank loads the same one; a bad choice is an error on every rank."""
        from gpt_train import collectives

        chosen, decision = None, None
        if self.world.is_main:
            try:
                chosen, init_url, note = self._choose()
                decision = (chosen and chosen.url, init_url, note, None)
            except CheckpointError as e:
                decision = (None, None, "", str(e))
        resume_url, init_url, note, error = collectives.broadcast_object(decision, storage=True)
        if error:
            raise CheckpointError(error)
        # Each rank reads the files itself; rank 0 verified every byte while choosing, so the others do not
        # hash them again. A failure on any one must end every rank with the same line, not leave the others
        # waiting in the next collective.
        found = init = None
        try:
            found = chosen or (load(resume_url, verify=False) if resume_url else None)
            if found and not chosen:
                self._check_course(found)
            init = find(init_url, ("model",)) if init_url else None
            mine = None
        except CheckpointError as e:
            mine = f"rank {self.world.rank}: {e}" if self.world.distributed else str(e)
        failed = [e for e in collectives.all_gather_object(mine, storage=True) if e]
        if failed:
            raise CheckpointError(failed[0])
        return found, init, note

    def _check_course(self, found: Checkpoint) -> None:
        """An exact resume needs the checkpoint's seed, batch and data: a difference is refused, naming each,
        unless checkpoint.allow_changes accepts it (then it is an event). Other changed settings are printed."""
        from gpt_train.config import LEAVES

        theirs, ours = found.meta.get("config", {}), self.about["config"]
        exact = {"train.seed": "seed", "train.batch_tokens": "batch"}
        diffs, free = [], []
        for key in LEAVES:
            before, now = _leaf(theirs, key), _leaf(ours, key)
            if before is None or before == now or key.startswith("checkpoint."):
                continue
            if key in exact:
                diffs.append((exact[key], f"{key} {before} -> {now}"))
            else:
                free.append(f"{key} {before} -> {now}")
        data_before = found.meta.get("data_fingerprint")
        if data_before and data_before != self.about["data_fingerprint"]:
            where = ", ".join(source["dir"] for source in ours["data"].get("sources") or [ours["data"]])
            diffs.append(("data", f"the data in {where} (fingerprint {self.about['data_fingerprint']}) "
                                  f"is not the checkpoint's ({data_before})"))
        refused = [(name, what) for name, what in diffs if name not in self.cfg.allow_changes]
        if refused:
            names = ",".join(dict.fromkeys(name for name, _ in refused))
            raise CheckpointError(f"resuming {found.url} would not continue the same run: "
                                  + "; ".join(what for _, what in refused)
                                  + f". Restore the checkpoint's settings, or accept with checkpoint.allow_changes={names}")
        self.course_changes = [what for _, what in diffs]
        if free:
            self.log("resume: settings changed since the checkpoint: " + "; ".join(free))

    def _choose(self) -> tuple[Checkpoint | None, str | None, str]:
        mode, init_from, run = self.cfg.resume, self.cfg.init_from, self.writer.store.url
        steps = self.writer.manifested_steps()
        if mode == "none":
            if steps and not self.cfg.overwrite:
                raise CheckpointError(f"run_dir '{run}' already has checkpoints (newest step {steps[-1]}) and "
                                      "checkpoint.resume=none: pick another run_dir, resume=auto, or overwrite=true")
            if steps:
                for name in (CHECKPOINTS, rundir.ROLLED_BACK, rundir.METRICS, rundir.EVENTS):
                    self.writer.store.remove(name)
            fresh = "starting fresh" + (" (old checkpoints removed: overwrite=true)" if steps else "")
            return None, init_from or None, fresh + (f" from the weights of {init_from}" if init_from else "")
        if (mode == "best" or mode.isdigit()) and not self._rolled_back_before(mode):
            return self._roll_back(mode), None, self.rollback["note"]
        found = self.writer.load_newest()
        if found:
            self._check_course(found)
            self._drop_newer(found.step)
            ignored = f"; checkpoint.init_from={init_from} ignored: the run has its own" if init_from else ""
            return found, None, f"resuming from {found.url} (step {found.step}){ignored}"
        if init_from:
            return None, init_from, f"no checkpoint of its own: starting from the weights of {init_from}"
        return None, None, "no checkpoint found: starting fresh"

    def _rolled_back_before(self, mode: str) -> bool:
        """resume=best or resume=STEP rolls a run back once: the same command, rerun by every requeue, then
        continues the branch that the rollback started instead of going back again. (A rollback recorded before
        events named their resume mode was resume=best's; a bad-step rollback has a cause instead.)"""
        from gpt_train.runlog import read_jsonl

        return any(e.get("event") == "rollback" and e.get("resume", None if "cause" in e else "best") == mode
                   for e in read_jsonl(self.writer.store, rundir.EVENTS))

    def _roll_back(self, mode: str) -> Checkpoint:
        """Resume from the checkpoint of the lowest val loss (best) or of step MODE; the newer ones that verify
        are set aside in RUN/rolled-back/ (kept, listed by `status`, out of retention's reach), not deleted."""
        run = self.writer.store.url
        if mode == "best":
            found = self.writer.load_best()
            if found is None:
                raise CheckpointError(f"checkpoint.resume=best but '{run}' has no checkpoint with a val loss")
            which = f"the best checkpoint {found.url} (step {found.step}, val loss {found.meta['val_loss']:.4f})"
        else:
            try:
                found = self.writer.load_step(int(mode))
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint.resume={mode}: {e}") from None
            which = f"the checkpoint {found.url} (step {found.step})"
        newest = max(manifested_steps(self.writer.store))
        self._check_course(found)  # before anything is moved: a refused resume changes nothing
        set_aside = self._drop_newer(found.step, rolling_back=True)
        where = f"{run}/{rundir.ROLLED_BACK}/"
        note = (f"rolled back from step {newest} to {which}" + (f"; steps {', '.join(map(str, set_aside))} set aside "
                                                                f"in {where}" if set_aside else
                                                                ", the newest that loads" if newest > found.step
                                                                else ", the newest")
                + "; later starts continue from the newest checkpoint")
        self.rollback = {"from_step": newest, "to_step": found.step, "set_aside": set_aside, "resume": mode,
                         "note": note}
        return found

    def _drop_newer(self, step: int, rolling_back: bool = False) -> list[int]:
        """Folders newer than the resume point would confuse retention and the next resume. Those whose files
        do not verify are removed, saying which check failed; those that verify (a rollback's, or one that
        failed to load for a reason that may pass, such as memory) are set aside, never deleted. Returns the
        steps set aside."""
        store, set_aside = self.writer.store, []
        for s, _ in list_steps(store):
            if s <= step:
                continue
            problem = rundir.verify(store, s)
            if problem is None:
                store.remove(f"{rundir.ROLLED_BACK}/{step_name(s)}")  # a half-finished earlier move
                store.move(step_folder(s), f"{rundir.ROLLED_BACK}/{step_name(s)}")
                set_aside.append(s)
                if not rolling_back:
                    self.log(f"checkpoint: {step_name(s)} verifies but did not load: set aside in "
                             f"{store.url}/{rundir.ROLLED_BACK}/")
                continue
            self.log(f"checkpoint: removing {step_name(s)}, newer than the resume point: {problem}")
            store.remove(f"{step_folder(s)}/{MANIFEST}")
            store.remove(step_folder(s))
        return set_aside

    def last_good(self) -> Checkpoint | None:
        """The newest checkpoint that loads, for a rollback inside a running job: rank 0 finds it, every rank
        reads it (a failure on one is an error on all)."""
        from gpt_train import collectives

        url = None
        if self.world.is_main:
            found = self.writer.load_newest()
            url = found and found.url
        url = collectives.broadcast_object(url, storage=True)
        if url is None:
            return None
        try:
            found, mine = (found if self.world.is_main else load(url, verify=False)), None
        except CheckpointError as e:
            found, mine = None, f"rank {self.world.rank}: {e}"
        failed = [e for e in collectives.all_gather_object(mine, storage=True) if e]
        if failed:
            raise CheckpointError(failed[0])
        return found

    # -- restoring -----------------------------------------------------------------------------

    def load_weights(self, found: Checkpoint) -> None:
        """The model's weights, before it is wrapped or compiled (FSDP shards it in place)."""
        check_compatible(found.meta, self.about["config"]["model"], self.about["tokenizer"], found.url)
        self.parts["model"].load_state_dict(found.model, found.url)

    def restore(self, found: Checkpoint | None) -> None:
        """Every other part from `found`; without one, fresh random streams for this rank."""
        if found is None:
            self.parts["rng"].reseed(0)
            return
        for name, part in self.parts.items():
            if name == "optimizer":
                part.load_state_dict(found.optimizer)
            elif name == "rng":
                if found.rng and len(found.rng) == self.world.world_size:
                    part.load_state_dict(found.rng[self.world.rank])
                else:  # another world size: fresh streams per rank; only dropout draws from them
                    part.reseed(found.step)
            elif name != "model":
                part.load_state_dict(found.meta)

    # -- saving --------------------------------------------------------------------------------

    def start_clock(self) -> None:
        """Wall-clock saves count from the first step, not from the start-up before it."""
        self._last_save = time.monotonic()

    def time_due(self) -> bool:
        """checkpoint.every_minutes of wall time have passed since the last save (or the first step)."""
        minutes = self.cfg.every_minutes
        return bool(minutes) and time.monotonic() - self._last_save >= 60 * minutes

    def step_due(self, step: int) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0

    def save(self, val_loss: float | None, final: bool = False) -> float | None:
        """A checkpoint of every part now; written in the background. Returns, on rank 0, the seconds
        training waited: gathering every rank's RNG and the full state (FSDP gathers shards into rank 0's
        host memory), and the copy into staging buffers."""
        from gpt_train import collectives

        t0 = time.perf_counter()
        rngs = collectives.all_gather_object(self.parts["rng"].state_dict())
        model, optimizer = self.parts["model"].state_dict(), self.parts["optimizer"].state_dict()
        self._last_save = time.monotonic()
        if not self.world.is_main:
            return None
        meta = {}
        for name, part in self.parts.items():
            if name not in FILE_PARTS:
                meta.update(part.state_dict())
        meta.update(val_loss=val_loss, final=final, world_size=self.world.world_size, time=time.time(), **self.about)
        self.writer.save(meta["step"], model, optimizer, rngs, meta)
        return time.perf_counter() - t0

    def wait(self) -> bool:
        """Rank 0: wait for the checkpoint in flight; True when the last save landed."""
        return self.writer.wait()
