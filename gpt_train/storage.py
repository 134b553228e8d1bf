"""Files of a run on any fsspec URL: a local path, file://, s3://, gs://, memory://.

Object stores have no rename and no append. So a write here is an upload that the store makes visible
only once it is complete (one put, or for a large file a multipart upload completed last: atomic on every
object store) and, on local disk, a write to a temporary name followed by a rename. memory:// (tests) is
the exception: it shows a file while it is being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from gpt_train.errors import StorageError


class Store:
    """A folder at a URL. Paths given to its methods are relative to it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            raise StorageError(f"cannot open '{url}': {e} (install gpt-train[s3] or gpt-train[gcs])") from None
        except ValueError as e:
            raise StorageError(f"cannot open '{url}': {e}") from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fail(self, action: str, rel: str, e: Exception) -> StorageError:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return StorageError(f"no space left on device writing '{self.url}/{rel}'")
        return StorageError(f"cannot {action} '{self.url}/{rel}': {type(e).__name__}: {e}")

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file to write `rel` through piece by piece, so that no whole file need be in memory.
        Readers see the whole file or none of it (see the top of this module): the write completes when the
        block ends. An error in the block, the caller's or the storage's, raises StorageError and, but on
        memory://, leaves nothing new under the name."""
        target = self.path(rel)
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    with open(tmp, "wb") as f:
                        yield f
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                f = self.fs.open(target, "wb")
                try:
                    yield f
                except BaseException:
                    with contextlib.suppress(Exception):  # at worst an upload stays unfinished: never visible
                        f.discard()  # s3 and gcs abort the upload: no parts left behind, nothing appears
                    if isinstance(f, AbstractBufferedFile):
                        f.closed = True  # else its finalizer closes it, which would commit the part written
                    raise
                f.close()
        except Exception as e:
            raise self._fail("write", rel, e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._fail("read", rel, e) from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str = "") -> bool:
        try:
            return self.fs.exists(self.path(rel))
        except Exception as e:
            raise self._fail("reach", rel, e) from None

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel; [] when it does not exist."""
        try:
            self.fs.invalidate_cache(self.path(rel))
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._fail("list", rel, e) from None
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def move(self, src: str, dst: str) -> None:
        """A folder to another place in this store: a rename on local disk; on an object store a copy, then the
        source removed, so that an interruption leaves the source whole."""
        try:
            if self.local:
                os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
                os.replace(self.path(src), self.path(dst))
            else:
                self.fs.copy(self.path(src), self.path(dst), recursive=True)
                self.fs.rm(self.path(src), recursive=True)
        except Exception as e:
            raise self._fail("move", src, e) from None

    def check_writable(self) -> None:
        """Fail before training starts, not at the first checkpoint an hour later."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"ok")
        self.remove(probe)
