"""Token shards on object storage (s3://, gs://, any fsspec URL that is not a local path), read without a shared
file system.

A shard is read in fixed-size blocks by ranged requests, and each block is kept in a cache on local disk
(`data.cache_dir`, bounded by `data.cache_gb`, least recently used blocks evicted first), which every run and
rank of the machine may share. A block is written to a temporary name and renamed into place, so a process
killed mid-write leaves no file that a later read takes for a whole block; a cached block's name holds the
shard's size and ETag, so a shard replaced on the store never serves the old one's blocks. A shard that changes
under a running job (its size or ETag differs, checked at every fetch) stops the job with a DataError: the
windows it drew so far and the ones it would draw next come from different data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import lru_cache
from pathlib import Path

import numpy as np

from gpt_train import formats
from gpt_train.errors import DataError, StorageError
from gpt_train.storage import Store

# Big enough that a request's latency (tens of ms on S3 or GCS) is a small part of its transfer, and that a
# split of a few GB is a few hundred objects in the cache; small enough that a random window, a few KB, does
# not pull much it does not need while the cache still warms up.
BLOCK_BYTES = 8 << 20
FETCH_THREADS = 8  # one ranged request is bound by its latency; object stores serve many side by side
_TMP = ".tmp-"  # the names of blocks being written: never read, removed once older than _STALE_TMP_S
_STALE_TMP_S = 600.0  # a writer alive for this long on one block is gone (a fetch takes well under a minute)
_TOUCH_S = 10.0  # a cached block read again is marked used at most this often: recency, without a syscall a read


def is_remote(data_dir: str) -> bool:
    return "://" in data_dir and not data_dir.startswith("file://")


def _credentials_hint(url: str) -> str:
    scheme = url.split("://", 1)[0]
    where = {"s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role; AWS_ENDPOINT_URL for "
                   "another S3 service", "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
                   "login`"}.get(scheme, f"the {scheme} filesystem's settings")
    return f"check the URL and the credentials ({where})"


def _open_store(data_dir: str) -> Store:
    try:
        return Store(data_dir)
    except StorageError as e:
        raise DataError(str(e)) from None


def read_meta_text(data_dir: str) -> str:
    """The text of `data_dir`'s meta.json; an unreachable store or a missing file is a DataError that says what to
    do. A data directory on object storage needs its meta.json: without one, detecting llm.c or nanoGPT files and
    describing them would read every shard."""
    url = f"{data_dir.rstrip('/')}/meta.json"
    try:
        return _open_store(data_dir).read_text("meta.json")
    except FileNotFoundError:
        raise DataError(f"no prepared data at '{data_dir}' (missing {url}): run `gpt-train prepare INPUT... --out "
                        f"{data_dir}`; for llm.c or nanoGPT files, `gpt-train prepare --index` a local copy and upload "
                        "its meta.json beside them") from None
    except StorageError as e:
        raise DataError(f"{e}: {_credentials_hint(data_dir)}") from None


def _version(info: dict) -> str:
    """What changes when an object is replaced: S3's and Azure's ETag, GCS's etag or generation ('' where the
    filesystem gives none; the size is compared too)."""
    return str(info.get("ETag") or info.get("etag") or info.get("generation") or "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


class Cache:
    """The blocks of remote shards on local disk, at most `max_bytes` of them in `root`, and the threads that
    fetch them. One per process and folder (`cache_at`), shared by every shard read through it."""

    def __init__(self, root: str, max_bytes: int):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[bytes]] = {}
        self._touched: dict[str, float] = {}  # blocks this process read from the cache or wrote, and when
        self._queue: queue.SimpleQueue[tuple[Future[bytes], str, Callable[[], bytes]]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []  # started by the first fetch: none in a run on local shards

    def folder(self, data_dir: str) -> Path:
        """Where the blocks of `data_dir`'s shards go: a folder per URL, named so a person can tell which."""
        return self.root / f"{_slug(data_dir)}-{hashlib.sha256(data_dir.encode()).hexdigest()[:8]}"

    def read(self, path: str, length: int, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) of the cached block at `path`, None unless a whole one (`length` bytes) is there."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._touched.pop(path, None)
            return None
        try:
            if os.fstat(fd).st_size != length:  # not a block _store wrote; fetched again, over it
                self._touched.pop(path, None)
                return None
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
        now = time.monotonic()
        if now - self._touched.get(path, -_TOUCH_S) >= _TOUCH_S:
            self._touched[path] = now
            try:
                os.utime(path)
            except FileNotFoundError:  # evicted by another process meanwhile: the bytes read are whole
                pass
        return data

    def cached(self, path: str, length: int) -> bool:
        """Whether the block is on disk; one this process has read or written is taken to be without a look (a
        hint may be wrong where another process evicted it: the read then fetches it)."""
        if path in self._touched:
            return True
        try:
            return os.stat(path).st_size == length
        except FileNotFoundError:
            return False

    def fetch(self, path: str, fetch: Callable[[], bytes]) -> Future[bytes]:
        """The block at `path`, fetched by `fetch` on a fetch thread and cached; a block already on its way is not
        asked for twice."""
        with self._lock:
            if not self._threads:
                # Daemon threads, not a ThreadPoolExecutor: the interpreter would wait at exit for every fetch
                # queued ahead. One killed mid-write leaves a temporary file, which no read takes for a block.
                self._threads = [threading.Thread(target=self._work, name=f"shard-fetch-{i}", daemon=True)
                                 for i in range(FETCH_THREADS)]
                for thread in self._threads:
                    thread.start()
            future = self._inflight.get(path)
            if future is None:
                future = self._inflight[path] = Future()
                self._queue.put((future, path, fetch))
        return future

    def _work(self) -> None:
        while True:
            future, path, fetch = self._queue.get()
            try:
                data = fetch()
                self._store(path, data)
                future.set_result(data)
            except BaseException as e:  # handed to whoever reads the block; a prefetch nobody reads drops it
                future.set_exception(e)
            finally:
                with self._lock:
                    del self._inflight[path]

    def _store(self, path: str, data: bytes) -> None:
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f"{_TMP}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # else a crash of the machine could leave the renamed name with no data
            os.replace(tmp, path)
            self._touched[path] = time.monotonic()
            self._evict()
        except OSError:
            # A full or read-only cache disk costs speed, not the run: the block is served from memory.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _evict(self) -> None:
        """Remove the least recently used blocks of the whole folder until it holds at most max_bytes, and
        temporary files that their writer left behind. Any process may evict any block: a block removed under a
        reader that has it open is still read whole; one that it opens next is fetched again."""
        blocks = []
        now = time.time()
        for entry in (e for d in os.scandir(self.root) if d.is_dir() for e in os.scandir(d.path)):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith(_TMP):
                if now - st.st_mtime > _STALE_TMP_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            else:
                blocks.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in blocks)
        for _, size, name in sorted(blocks):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            self._touched.pop(name, None)
            total -= size


@lru_cache(maxsize=None)
def cache_at(cache_dir: str, cache_gb: float) -> Cache:
    """The process's cache in `cache_dir`: every split read through it shares its bound and its threads."""
    return Cache(cache_dir, int(cache_gb * 1e9))


class RemoteShard:
    """One token file on object storage, read as the memmap of a local one is: len() ids, and [a:b] a NumPy array
    of them (past the header), fetched in blocks of BLOCK_BYTES of the object through `cache`."""

    def __init__(self, store: Store, name: str, info: dict, shard_format: str, dtype: np.dtype, cache: Cache,
                 folder: Path):
        self.store, self.name, self.cache = store, name, cache
        self.url = f"{store.url}/{name}"
        self.size, self.version = int(info["size"]), _version(info)
        self.dtype, self.offset = dtype, formats.HEADER_BYTES[shard_format]
        self.block_bytes = BLOCK_BYTES
        # The size and version in the name: a replaced object's blocks are other files.
        key = hashlib.sha256(f"{self.size}:{self.version}".encode()).hexdigest()[:12]
        self._prefix = str(folder / f"{_slug(name)}.{key}")
        head = self._bytes(0, min(self.offset, self.size)) if self.offset else b""
        found, self.count = formats.parse_header(self.url, shard_format, dtype, self.size, head)
        formats.check_dtype(self.url, found, dtype)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.count)
        assert step == 1, "Split reads windows: contiguous ids"
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        return np.frombuffer(self._bytes(self.offset + start * size, self.offset + stop * size), self.dtype)

    def prefetch(self, start: int, stop: int) -> None:
        """Start fetching the blocks that ids [start, stop) lie in, unless they are cached."""
        size = self.dtype.itemsize
        for block in self._blocks(self.offset + start * size, self.offset + stop * size):
            if not self.cache.cached(self._path(block), self._length(block)):
                self.cache.fetch(self._path(block), lambda block=block: self._fetch(block))

    def _blocks(self, lo: int, hi: int) -> range:
        return range(lo // self.block_bytes, (hi - 1) // self.block_bytes + 1)

    def _path(self, block: int) -> str:
        return f"{self._prefix}.{block:06d}"

    def _length(self, block: int) -> int:
        return min(self.block_bytes, self.size - block * self.block_bytes)

    def _bytes(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the object, from the cache or fetched, the blocks it needs fetched side by side."""
        parts: list[tuple[bytes | Future[bytes], int, int]] = []  # the bytes, or the whole block to come; a span of it
        for block in self._blocks(lo, hi):
            base = block * self.block_bytes
            start, stop = max(lo, base) - base, min(hi, base + self.block_bytes) - base
            path = self._path(block)
            data = self.cache.read(path, self._length(block), start, stop)
            parts.append((data if data is not None else self.cache.fetch(path, lambda b=block: self._fetch(b)),
                          start, stop))
        return b"".join(part if isinstance(part, bytes) else part.result()[start:stop] for part, start, stop in parts)

    def _fetch(self, block: int) -> bytes:
        """One block by a ranged request, then the object's size and version checked against what the job opened.
        A failure of the store itself propagates as it is: mid-run it is worth a retry, which a restart gives."""
        lo = block * self.block_bytes
        data = self.store.fs.cat_file(self.store.path(self.name), start=lo, end=lo + self._length(block))
        self.store.fs.invalidate_cache(self.store.path(self.name))
        info = self.store.fs.info(self.store.path(self.name))
        size, version = int(info["size"]), _version(info)
        if (size, version) != (self.size, self.version) or len(data) != self._length(block):
            raise DataError(f"shard '{self.url}' changed while the job ran: it had {self.size:,} bytes, version "
                            f"{self.version or '-'}, and now has {size:,} bytes, version {version or '-'}. The "
                            "windows drawn so far came from the old one: put the old shard back to continue this "
                            "run, or start a new run on the new data (checkpoint.init_from=... for its weights)")
        return data


def open_shards(data_dir: str, names: list[str], shard_format: str, dtype: np.dtype, cache: Cache) -> list[RemoteShard]:
    """The shards `names` of `data_dir`, each checked to be there (one listing of the folder) and its header read;
    a missing one or an unreachable store is a DataError naming it and what to do."""
    store = _open_store(data_dir)
    try:
        listing = {entry["name"]: entry for entry in store.fs.ls(store.path(), detail=True)}
    except FileNotFoundError:
        listing = {}
    except Exception as e:  # any storage library's error
        raise DataError(f"cannot list '{data_dir}': {type(e).__name__}: {e}: {_credentials_hint(data_dir)}") from None
    folder = cache.folder(store.url)
    shards = []
    for name in names:
        info = listing.get(store.path(name))
        if info is None:
            raise DataError(f"shard '{store.url}/{name}' listed in meta.json is missing: upload it, or run "
                            f"`gpt-train prepare --force` into '{data_dir}'")
        shards.append(RemoteShard(store, name, info, shard_format, dtype, cache, folder))
    return shards
