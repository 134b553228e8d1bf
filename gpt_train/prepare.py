"""`gpt-train prepare`: tokenize text into flat train/val token shards that training memory-maps; or, with
`--index DIR`, describe the llm.c or nanoGPT token files already in DIR (gpt_train.formats) without touching them.

Inputs are text files (one document each), JSONL (`.jsonl`, `.json`, optionally compressed, one document per
line in field `text`) and parquet (column `text`), given as paths, directories, globs or fsspec URLs.

Design choices, and why:
- Memory stays bounded whatever the corpus size: files are read in ~1 MB blocks, a long document is cut into
  ~1 MB pieces, a few pieces per worker are in flight, and tokens are appended to the shard files as they come.
- A long document is cut only at the end of a word: after a letter, before a non-letter ("word|, next").
  GPT-2's and GPT-4's split patterns both end a pre-token there and never look past it, so the pieces encode
  to exactly the ids of the whole document. (Text with no word end in 0.5 MB, which real text does not have,
  is cut anyway: still lossless, but the ids may differ from the whole's at that cut.)
- Encoding runs in a pool of worker processes, one task per ~1 MB of text, while the main process keeps
  reading and writing (threads scaled worse: parts of tiktoken's calls hold the GIL). Input that fits in one
  task is encoded on a single thread, with no pool to start. Workers are forked, which costs nothing, on
  Linux when this process has no other thread; else spawned, ~0.4 s of CPU each: forking a process whose
  other threads (s3fs' event loop, say) may hold locks can deadlock the child, and macOS' system libraries
  do not survive a fork.
- Each document is followed by <|endoftext|>, so the model sees where documents end.
- The tokenizer is GPT-2's, or with --train-tokenizer a byte-level BPE learned (rustbpe) from the first ~1 GB
  of the same text before encoding, saved as DIR/tokenizer.bpe. Ids are uint16 when the vocabulary fits.
  `--bundled` is the bundled book with a BPE of BUNDLED_VOCAB ids: the default preset's data.
- Validation split: document k goes to val when floor((k+1)*f) > floor(k*f), i.e. every (1/f)-th document,
  spread over the corpus and independent of the number of workers. When the corpus has fewer than 1/f
  documents (a single book), no document qualifies; then val is the last f of the token stream instead (at
  least one token), cut from the end of train. meta.json records which rule applied in `val_from`.
- Work already done is skipped: meta.json records the sources (path, size, modification time or ETag), the
  tokenizer and the options; a second run with the same ones prints "up to date". Output is written to a
  staging folder and moved in place at the end, meta.json last, so an interrupted run never leaves a
  meta.json that points at partial shards. A failed run leaves the previous output as it was.
- Progress and MB/s count input bytes as stored (compressed bytes for .gz files).
- Shards are gpt-train's bare ids, or with --format llmc llm.c's (a header, then the ids), so that llm.c's
  tools train on the same data; training reads both in place.
- meta.json records the UTF-8 bytes of each split's text (`text_bytes`), so that a loss can be read in bits
  per byte. They are summed from the ids (each id's byte length; <|endoftext|> counts 0), which is exact for
  byte-level BPE and also holds for val cut from the tail of train, whose text is never seen apart.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression
from tqdm import tqdm

from gpt_train import formats
from gpt_train import tokenizer as tokenizers
from gpt_train.errors import DataError

FORMAT = formats.META_FORMAT  # what gpt_train.data reads (it is not imported here: it imports torch)
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16: few files, and training windows never cross a shard
BLOCK_CHARS = 1 << 20  # read size, and the size of the pieces a long document is cut into
ITEM_CHARS = 1 << 20  # text per task handed to a worker: large enough that per-task overhead is negligible
VAL_FRACTION = 0.005
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # a BPE is trained on at most the first ~1 GB of text
_COPY_TOKENS = 1 << 22  # tokens per read when moving the tail of train to val
_STAGING = ".prepare-partial"
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF [^\n]*\n", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF ", re.MULTILINE | re.IGNORECASE)
# protocol: (the package of its fsspec file system, the pyproject extra that installs it)
_PROTOCOL_PACKAGE = {"hf": ("huggingface_hub", "hf"), "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
                     "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


# The default preset's vocabulary: a BPE learned from the bundled book beats GPT-2's 50257 ids there, whose
# embedding would be most of a small model's parameters and CPU time (docs/reading-the-loss.md has the study).
BUNDLED_VOCAB = 16384


def bundled_corpus() -> str:
    """Moby Dick (1.2 MB, public domain), shipped so that the quickstart needs no download."""
    return str(Path(__file__).resolve().parent / "assets" / "moby_dick.txt")


def prepare_bundled(out: str, *, workers: int | None = None, force: bool = False) -> dict:
    """The bundled corpus as the default preset reads it; `make train`, the Docker image and `ensure_bundled`
    all prepare it here, so that the tokenizer is chosen in one place."""
    return prepare([bundled_corpus()], out, train_tokenizer=BUNDLED_VOCAB, workers=workers, force=force)


def ensure_bundled(data_dir: str, say: Callable[[str], None] = print) -> bool:
    """Prepare the bundled corpus into `data_dir` if it is the default preset's data folder and holds no
    prepared data yet; returns whether it did. After `pip install` there is no `make train` to prepare it,
    so that `gpt-train train default` in an empty folder does it itself."""
    from gpt_train.config import load_config

    here = Path(data_dir).expanduser()
    if (here / "meta.json").exists() or here.resolve() != Path(load_config("default").data.dir).resolve():
        return False
    say(f"{data_dir} holds no prepared data: preparing the bundled corpus into it "
        f"(gpt-train prepare --bundled --out {data_dir})")
    prepare_bundled(str(here))
    return True


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned type that holds every id: half the disk and page cache for vocabularies <= 65536."""
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    fs: fsspec.AbstractFileSystem
    path: str  # as the filesystem names it
    url: str  # as meta.json records it: an absolute local path or a URL
    size: int
    modified: str  # modification time, ETag or similar: with the size, how a changed input is noticed

    def record(self) -> dict:
        return {"path": self.url, "bytes": self.size, "modified": self.modified}


def resolve_sources(inputs: list[str]) -> list[Source]:
    """Files named by paths, directories, globs and URLs, in order, each once; a name matching nothing is an error."""
    sources: dict[str, Source] = {}
    for spec in inputs:
        fs, path = _filesystem(spec)
        for info in _expand(fs, path, spec):
            url = info["name"] if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(info["name"])
            sources.setdefault(url, Source(fs, info["name"], url, int(info["size"]), _modified(info)))
    return list(sources.values())


def _filesystem(spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as e:  # a protocol whose package is not installed, or no such protocol
        protocol = spec.split("://", 1)[0] if "://" in spec else "file"
        package, extra = _PROTOCOL_PACKAGE.get(protocol, (None, None))
        needs = (f"; reading {protocol}:// needs {package} (pip install 'gpt-train[{extra}]')"
                 + (" and network access" if protocol == "hf" else "")) if package else ""
        raise DataError(f"cannot read '{spec}': {e}{needs}") from None


def _expand(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> list[dict]:
    try:
        if _is_glob(path):
            found = fs.glob(path, detail=True)
        else:
            info = fs.info(path)
            if info["type"] != "directory":
                return [info]
            found = fs.find(path, detail=True)
    except FileNotFoundError:
        raise DataError(f"input file '{spec}' not found") from None
    except Exception as e:  # permissions, network, credentials: each remote filesystem raises its own kinds
        raise DataError(f"cannot read '{spec}': {e}") from None
    files = [info for name, info in sorted(found.items())
             if info["type"] == "file" and not Path(name).name.startswith(".")]
    if not files:
        raise DataError(f"no input file matches '{spec}'" if _is_glob(path)
                        else f"input directory '{spec}' has no files")
    return files


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _modified(info: dict) -> str:
    for key in ("mtime", "LastModified", "last_modified", "ETag", "created"):
        value = info.get(key)
        if value is not None:  # the same file can report a float or a datetime, depending on the call
            return str(value.timestamp() if isinstance(value, datetime.datetime) else value)
    return ""


def _documents(source: Source, raw: BinaryIO) -> Iterator[Iterable[str]]:
    """Each document of a source, as text blocks (a text file is one document, read block by block)."""
    name = source.path.lower()
    codec = infer_compression(name)
    if codec:
        name = name.rsplit(".", 1)[0]
    if name.endswith(".parquet"):
        yield from ([text] for text in _parquet_texts(source, raw))
        return
    text = io.TextIOWrapper(compr[codec](raw, mode="rb") if codec else raw, encoding="utf-8-sig",
                            errors="replace", newline="")  # newline="": keep \r\n as written
    if name.endswith((".jsonl", ".json")):
        yield from ([doc] for doc in _jsonl_texts(source, text))
    else:
        yield _line_blocks(text)


def _line_blocks(text: io.TextIOBase) -> Iterator[str]:
    """Blocks of ~BLOCK_CHARS that end at a line end (so a Gutenberg marker line is never split)."""
    carry = ""
    while chunk := text.read(BLOCK_CHARS):
        block = carry + chunk
        cut = block.rfind("\n") + 1 or len(block)
        carry = block[cut:]
        yield block[:cut]
    if carry:
        yield carry


def _jsonl_texts(source: Source, lines: Iterable[str]) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source.url} line {number} is not JSON ({e.msg}); JSON inputs need one object per "
                            "line (JSONL)") from None
        if not isinstance(record, dict):
            raise DataError(f"{source.url} line {number} is not a JSON object; JSON inputs need one object per line "
                            "(JSONL)")
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{source.url} line {number} has no string field 'text'")
        yield text


def _parquet_texts(source: Source, raw: BinaryIO) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {source.url} needs pyarrow: pip install 'gpt-train[parquet]'") from None
    table = pq.ParquetFile(raw)
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{source.url} has no column 'text' (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _strip_gutenberg(blocks: Iterable[str]) -> Iterator[str]:
    """Drop Project Gutenberg's license header (up to the `*** START OF` line, looked for in the first block)
    and footer (from the `*** END OF` line on)."""
    blocks = iter(blocks)
    first = next(blocks, "")
    start = _GUTENBERG_START.search(first)
    for block in itertools.chain([first[start.end():] if start else first], blocks):
        end = _GUTENBERG_END.search(block)
        if end:
            yield block[:end.start()]
            return
        yield block


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """A document's text re-cut into pieces of at most ~BLOCK_CHARS, at gaps that encode exactly (see top)."""
    carry = ""
    for block in blocks:
        text = carry + block
        start = 0
        while len(text) - start > BLOCK_CHARS:
            cut = _word_end(text, start + BLOCK_CHARS // 2, start + BLOCK_CHARS)
            yield text[start:cut]
            start = cut
        carry = text[start:]
    if carry:
        yield carry


def _word_end(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi] with a letter before it and a non-letter at it (str.isalpha is regex's \\p{L});
    hi if there is none."""
    for i in range(hi, lo, -1):
        if text[i - 1].isalpha() and not text[i].isalpha():
            return i
    return hi


def _stream(sources: list[Source], strip_gutenberg: bool) -> Iterator[tuple[str, bool, int]]:
    """(piece, ends a document, input bytes read so far) over all sources; empty documents are skipped."""
    done = 0
    for source in sources:
        with source.fs.open(source.path, "rb") as raw:
            for blocks in _documents(source, raw):
                previous = None
                for piece in _pieces(_strip_gutenberg(blocks) if strip_gutenberg else blocks):
                    if previous is not None:
                        yield previous, False, done + min(raw.tell(), source.size)
                    previous = piece
                if previous is not None:
                    yield previous, True, done + min(raw.tell(), source.size)
        done += source.size


def _is_val(document: int, val_fraction: float) -> bool:
    return math.floor((document + 1) * val_fraction) > math.floor(document * val_fraction)


def _items(stream: Iterable[tuple[str, bool, int]], val_fraction: float) -> Iterator[tuple[list, int]]:
    """Tasks of ~ITEM_CHARS: ([(text, split, ends a document), ...], input bytes read so far)."""
    item: list[tuple[str, str, bool]] = []
    chars = document = done = 0
    for piece, ends, done in stream:
        item.append((piece, "val" if _is_val(document, val_fraction) else "train", ends))
        chars += len(piece)
        document += ends
        if chars >= ITEM_CHARS:
            yield item, done
            item, chars = [], 0
    if item:
        yield item, done


# ---------------------------------------------------------------------------------------------------- outputs


def token_bytes(tok: tokenizers.Tokenizer) -> np.ndarray:
    """The UTF-8 bytes each id spells, 0 for <|endoftext|>: byte-level BPE is lossless, so the sum over a token
    stream is the byte count of its text (as decoded from the input), without decoding it."""
    lengths = np.zeros(tok.n_vocab, np.int64)
    for token, rank in tok.ranks.items():
        lengths[rank] = len(token)
    return lengths


class _ShardWriter:
    """Appends one split's tokens to shards (`<split>-00000.bin`, ... or llm.c's) of at most `shard_tokens` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, shard_format: str,
                 byte_lengths: np.ndarray):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shard_format, self.byte_lengths = shard_format, byte_lengths
        self.header_bytes = formats.HEADER_BYTES[shard_format]
        self.shards: list[str] = []
        self.counts: list[int] = []  # tokens of each shard: an llm.c header holds its own
        self.tokens = 0
        self.max_id = -1  # recorded, so that training checks the vocabulary without reading every shard
        self.text_bytes = 0  # recorded, for losses in bits per byte
        self._file: BinaryIO | None = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._room == 0:
                self.close()
                self.shards.append(formats.shard_name(self.shard_format, self.split, len(self.shards)))
                self.counts.append(0)
                self._file = open(self.directory / self.shards[-1], "wb")
                self._file.write(bytes(self.header_bytes))  # written by close, once the count is known
                self._room = self.shard_tokens
            head, ids = ids[: self._room], ids[self._room :]
            head.tofile(self._file)
            if len(head):
                self.max_id = max(self.max_id, int(head.max()))
                self.text_bytes += int(self.byte_lengths[head].sum())
            self._room -= len(head)
            self.tokens += len(head)
            self.counts[-1] += len(head)

    def close(self) -> None:
        if self._file:
            if self.header_bytes:
                self._file.seek(0)
                self._file.write(formats.llmc_header(self.counts[-1], self.dtype))
            self._file.close()
        self._file, self._room = None, 0


def _move_tail(train: _ShardWriter, val: _ShardWriter, count: int) -> None:
    """Move the last `count` tokens of (closed) train to val, in order, a bounded block at a time."""
    keep, offset, kept, kept_counts = train.tokens - count, 0, [], []
    itemsize, header = train.dtype.itemsize, train.header_bytes
    for name, n in zip(train.shards, train.counts):
        path = train.directory / name
        cut = min(max(keep - offset, 0), n)
        for start in range(cut, n, _COPY_TOKENS):
            val.write(np.fromfile(path, train.dtype, count=min(_COPY_TOKENS, n - start),
                                  offset=header + start * itemsize))
        if cut:
            os.truncate(path, header + cut * itemsize)
            if header:
                with open(path, "r+b") as f:
                    f.write(formats.llmc_header(cut, train.dtype))
            kept.append(name)
            kept_counts.append(cut)
        else:
            path.unlink()
        offset += n
    train.shards, train.counts, train.tokens = kept, kept_counts, keep
    train.text_bytes -= val.text_bytes  # val was empty: what it holds now is what train gave


_worker_tokenizer: tokenizers.Tokenizer | None = None  # set in each worker process by _start_worker


def _start_worker(tok: tokenizers.Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_item(tok: tokenizers.Tokenizer | None, dtype: np.dtype, item: list[tuple[str, str, bool]]) -> dict:
    """{split: ids} of one task; `tok` None in a worker process, which has its own."""
    tok = tok or _worker_tokenizer
    ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    eot = np.array([tok.eot], dtype)
    for text, split, ends in item:
        ids[split].append(tok.encode_array(text).astype(dtype, copy=False))
        if ends:
            ids[split].append(eot)
    return {split: np.concatenate(arrays) for split, arrays in ids.items() if arrays}


def _pool(tok: tokenizers.Tokenizer, workers: int) -> tuple[Executor, tokenizers.Tokenizer | None, str]:
    """(executor, the tokenizer to pass with each task: None where the workers hold their own, what it is)."""
    if workers == 1:
        return ThreadPoolExecutor(1, thread_name_prefix="tokenize"), tok, "1 worker"
    start = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context(start), _start_worker, (tok,))
    return pool, None, f"{workers} worker processes, {start}ed"


def _tokenize(items: Iterable[tuple[list, int]], tok: tokenizers.Tokenizer, writers: dict[str, _ShardWriter],
              workers: int, progress: tqdm) -> str:
    """Encode tasks on `workers` workers while this process reads ahead and writes results in input order;
    returns what the workers were."""
    pending: deque[tuple[Future, int]] = deque()
    read = 0

    def write_oldest() -> None:
        nonlocal read
        future, done = pending.popleft()
        for split, ids in future.result().items():
            writers[split].write(ids)
        progress.update(done - read)
        read = done

    dtype = writers["train"].dtype
    pool, task_tok, what = _pool(tok, workers)
    try:
        with pool:
            try:
                for item, done in items:
                    pending.append((pool.submit(_encode_item, task_tok, dtype, item), done))
                    if len(pending) > 2 * workers:  # every worker busy, one task queued each: more only costs memory
                        write_oldest()
                while pending:
                    write_oldest()
            finally:
                for future, _ in pending:
                    future.cancel()
    except BrokenProcessPool:
        raise DataError(f"an encoding worker process died (killed for lack of memory?); the output was left as it "
                        f"was; try fewer workers (--workers {max(1, workers // 2)})") from None
    return what


# ---------------------------------------------------------------------------------------------------- command


def prepare(inputs: list[str], out: str, *, val_fraction: float = VAL_FRACTION, train_tokenizer: int | None = None,
            strip_gutenberg: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            force: bool = False, shard_format: str = formats.NATIVE, tokenizer: str | None = None) -> dict:
    """Tokenize `inputs` into the local directory `out` (see the module docstring); returns its meta.json.

    `workers` is the number of encoding processes (None or 0: one per core this process may use); 1, or
    input that fits in one task, encodes on a single thread instead. `shard_format` llmc writes llm.c's shards
    (version 1, uint16, for vocabularies up to 65536 ids; version 7, uint32, above), which its tools read too.
    `tokenizer`: another prepared directory (or a tokenizer.bpe file) whose tokenizer to use, so that the two
    can be mixed in one run (data.sources needs one tokenizer)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    if shard_format not in (formats.NATIVE, formats.LLMC):
        raise DataError(f"--format {shard_format} is not written, only read (with --index): prepare writes "
                        f"{formats.NATIVE} or {formats.LLMC}")
    if shard_format == formats.LLMC and shard_tokens > formats.LLMC_MAX_TOKENS:
        raise DataError(f"--shard-tokens {shard_tokens} does not fit llm.c's header, which counts a shard's tokens "
                        f"in an int32: at most {formats.LLMC_MAX_TOKENS}")
    if tokenizer and train_tokenizer:
        raise DataError("give --tokenizer (use that one) or --train-tokenizer (learn one), not both")
    if workers is not None and workers < 0:
        raise DataError(f"--workers must not be negative, got {workers}")
    if "://" in out and not out.startswith("file://"):
        raise DataError(f"--out must be a local directory (training memory-maps the shards), got '{out}'")
    out_dir = Path(out.removeprefix("file://")).expanduser()
    sources = resolve_sources(inputs)
    wanted = {"format": FORMAT, "sources": [s.record() for s in sources], "val_fraction": val_fraction,
              "options": {"strip_gutenberg": strip_gutenberg, "shard_tokens": shard_tokens,
                          "train_tokenizer": train_tokenizer}}
    given = load_tokenizer(tokenizer) if tokenizer else None
    if not train_tokenizer:
        wanted["tokenizer"] = (given or tokenizers.gpt2()).identity()
    current = None if force else _up_to_date(out_dir, wanted, shard_format)
    if not force and not current:
        _refuse_other_input(out_dir, wanted)
    if current:
        splits = ", ".join(f"{split} {info['tokens']:,}" for split, info in current["splits"].items())
        unknown = any("text_bytes" not in info for info in current["splits"].values())
        print(f"{out_dir} is up to date ({splits} tokens); --force redoes it"
              + (", and records the bytes of text that bits per byte need" if unknown else ""), flush=True)
        return current
    tasks = math.ceil(sum(s.size for s in sources) / ITEM_CHARS)  # ~1 per MB: more workers would idle
    return _build(sources, out_dir, wanted, max(1, min(workers or _cores(), tasks)), shard_format, given)


def load_tokenizer(spec: str) -> tokenizers.Tokenizer:
    """--tokenizer: the tokenizer of a prepared data directory (as its meta.json records it, hash checked), or
    a tokenizer.bpe file that gpt-train wrote (read as text: never code)."""
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise DataError(f"--tokenizer '{spec}' is a directory without meta.json: give a prepared data "
                            f"directory or a {tokenizers.BPE_FILE} file")
        try:
            identity = json.loads((path / "meta.json").read_text())["tokenizer"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--tokenizer '{spec}': its meta.json records no tokenizer") from None
        return tokenizers.from_identity(identity, str(path))
    return tokenizers.load_file(spec)


def _build(sources: list[Source], out_dir: Path, wanted: dict, workers: int, shard_format: str,
           given: tokenizers.Tokenizer | None = None) -> dict:
    """Tokenize into a staging folder, then move the result in place; a failure leaves `out_dir` as it was."""
    options = wanted["options"]
    staging = out_dir / _STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    writers: dict[str, _ShardWriter] = {}
    try:
        tok = given or _tokenizer(sources, options["train_tokenizer"], options["strip_gutenberg"], staging)
        if given and given.name == "bpe":  # beside the shards, as a learned one is: the directory stands alone
            tokenizers.save(given, staging / tokenizers.BPE_FILE)
        dtype = token_dtype(tok.n_vocab)
        lengths = token_bytes(tok)
        writers = {split: _ShardWriter(staging, split, dtype, options["shard_tokens"], shard_format, lengths)
                   for split in ("train", "val")}
        started = time.perf_counter()
        what = _tokenize_all(sources, tok, writers, wanted["val_fraction"], options["strip_gutenberg"], workers)
        val_from = "documents" if writers["val"].tokens else _val_from_tail(writers, wanted["val_fraction"])
        seconds = time.perf_counter() - started
        meta = {**wanted, "shard_format": shard_format, "header_bytes": formats.HEADER_BYTES[shard_format],
                "tokenizer": tok.identity(), "dtype": dtype.name, "val_from": val_from,
                "splits": {split: {"shards": w.shards, "tokens": w.tokens, "max_id": w.max_id,
                                   "text_bytes": w.text_bytes} for split, w in writers.items()}}
        _publish(staging, out_dir, meta)
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for split, w in writers.items():
        print(f"{split}: {w.tokens:,} tokens in {len(w.shards)} shard(s), {w.text_bytes:,} bytes of text", flush=True)
    megabytes = sum(s.size for s in sources) / 1e6
    print(f"prepared {out_dir}: {megabytes:.1f} MB in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s, "
          f"{what}), tokenizer {tok.name} ({tok.n_vocab} ids), {dtype.name} {shard_format} shards", flush=True)
    return meta


def index(data_dir: str, data_format: str = "auto", force: bool = False) -> dict:
    """Write the meta.json of the llm.c, nanoGPT or build-nanogpt (.npy) token files in `data_dir`, which stay as
    they are; returns it.

    Training could read them without it (gpt_train.data describes them from their headers at each start); what
    this adds takes a read of every token, once: the largest id of each split, checked against the vocabulary,
    and its bytes of text, counted by decoding (the byte length of each id), for bits per byte."""
    if data_format not in ("auto", formats.LLMC, formats.NANOGPT, formats.NPY):
        raise DataError(f"--index reads {formats.LLMC}, {formats.NANOGPT} or {formats.NPY} token files (or detects "
                        f"which: auto), not --format {data_format}")
    if "://" in data_dir and not data_dir.startswith("file://"):
        raise DataError(f"--index needs a local directory (training memory-maps the files), got '{data_dir}'")
    root = Path(data_dir.removeprefix("file://")).expanduser()
    found = formats.detect(root) if data_format == "auto" else data_format
    if found is None:
        raise DataError(f"'{root}' holds no llm.c shards (*_train_*.bin, *_val_*.bin), no nanoGPT train.bin and "
                        "val.bin and no build-nanogpt shards (*_train_*.npy, *_val_*.npy) to index")
    meta = formats.describe(root, found)
    before = None if force else _indexed(root, meta)
    if before:
        print(f"{root} is indexed already (its {found} files are unchanged); --force reads them again", flush=True)
        return before
    started = time.perf_counter()
    tok = tokenizers.from_identity(meta["tokenizer"], str(root))
    lengths = token_bytes(tok)
    dtype = np.dtype(meta["dtype"])
    for info in meta["splits"].values():
        info["max_id"], info["text_bytes"] = -1, 0
        for name in info["shards"]:
            tokens = formats.open_tokens(root / name, found, dtype)
            for start in range(0, len(tokens), _COPY_TOKENS):  # bounded memory, whatever the size of a shard
                chunk = np.asarray(tokens[start : start + _COPY_TOKENS])
                top = int(chunk.max())
                if top >= tok.n_vocab:
                    raise DataError(f"{root / name} holds token id {top}, outside the {tok.n_vocab} ids of tokenizer "
                                    f"{tok.name!r}: it was tokenized with another one, which gpt-train cannot index")
                info["max_id"] = max(info["max_id"], top)
                info["text_bytes"] += int(lengths[chunk].sum())
    partial = root / "meta.json.partial"
    partial.write_text(json.dumps(meta, indent=2) + "\n")
    partial.replace(root / "meta.json")
    splits = ", ".join(f"{name} {info['tokens']:,} tokens in {len(info['shards'])} file(s) "
                       f"({info['text_bytes']:,} bytes of text)" for name, info in meta["splits"].items())
    print(f"indexed {root} in {time.perf_counter() - started:.1f} s: {found} files, {dtype.name} ids of tokenizer "
          f"{tok.name}; {splits}; wrote meta.json and left the token files as they are", flush=True)
    return meta


def _indexed(root: Path, meta: dict) -> dict | None:
    """The meta.json that `index` wrote of these same files, if there is one; refuses to replace one from text."""
    try:
        before = json.loads((root / "meta.json").read_text())
        if "sources" in before:
            raise DataError(f"'{root / 'meta.json'}' was written by `gpt-train prepare` from text and describes its "
                            "shards already: pass --force to replace it with an index of the token files")
        scanned = {name: {key: info.pop(key) for key in ("max_id", "text_bytes")}
                   for name, info in before["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none, or not one index wrote
    if before != meta:
        return None
    for name, info in before["splits"].items():
        info.update(scanned[name])
    return before


class _Progress(tqdm):
    monitor_interval = 0  # no monitor thread, so that the encoding workers can be forked


def _tokenize_all(sources: list[Source], tok: tokenizers.Tokenizer, writers: dict[str, _ShardWriter],
                  val_fraction: float, strip_gutenberg: bool, workers: int) -> str:
    progress = _Progress(total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="tokenizing",
                         file=sys.stderr, disable=None)  # None: off when stderr is not a terminal
    with progress, contextlib.closing(_stream(sources, strip_gutenberg)) as stream:
        what = _tokenize(_items(stream, val_fraction), tok, writers, workers, progress)
    for writer in writers.values():
        writer.close()
    return what


def _cores() -> int:
    """Cores this process may use: under SLURM or taskset that is fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenizer(sources: list[Source], vocab: int | None, strip_gutenberg: bool, staging: Path) -> tokenizers.Tokenizer:
    if not vocab:
        return tokenizers.gpt2()
    started = time.perf_counter()

    def texts() -> Iterator[str]:
        seen = 0
        with contextlib.closing(_stream(sources, strip_gutenberg)) as stream:
            for piece, _, _ in stream:
                yield piece
                seen += len(piece)
                if seen >= TOKENIZER_TRAIN_CHARS:
                    return

    tok = tokenizers.train_bpe(texts(), vocab)
    tokenizers.save(tok, staging / tokenizers.BPE_FILE)
    print(f"trained a {tok.n_vocab}-id BPE tokenizer in {time.perf_counter() - started:.1f} s", flush=True)
    return tok


def _val_from_tail(writers: dict[str, _ShardWriter], val_fraction: float) -> str:
    train = writers["train"]
    count = max(1, math.ceil(val_fraction * train.tokens))
    if train.tokens - count < 1:
        raise DataError(f"the inputs hold {train.tokens} token(s): too little text for a train and a val split")
    _move_tail(train, writers["val"], count)
    writers["val"].close()
    return "tail"


def _refuse_other_input(out_dir: Path, wanted: dict) -> None:
    """A prepared folder is replaced silently only by its own inputs brought up to date: built from other files,
    it may be the data of a run that resumes from it, whose token stream would change under it."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        if "sources" not in meta and formats.of(meta) != formats.NATIVE:
            raise DataError(f"'{out_dir}' holds indexed {formats.of(meta)} token files: pass --force to replace its "
                            "meta.json, or choose another --out")
        before = sorted(src["path"] for src in meta["sources"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # nothing prepared there, or nothing that says from what
    now = sorted(src["path"] for src in wanted["sources"])
    if before != now:
        shown = ", ".join(before[:3]) + (f" and {len(before) - 3} more" if len(before) > 3 else "")
        raise DataError(f"'{out_dir}' was prepared from other input ({shown}): pass --force to replace it, "
                        "or choose another --out")


def _up_to_date(out_dir: Path, wanted: dict, shard_format: str) -> dict | None:
    """The existing meta.json if it was made from the same inputs and settings and its files are intact."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in wanted.items()):
        return None
    if formats.of(meta) != shard_format:
        return None
    try:
        if meta["tokenizer"].get("name") == "bpe":  # learned here or given: its file must be there, intact
            tokenizers.from_identity(meta["tokenizer"], str(out_dir))
        itemsize, header = np.dtype(meta["dtype"]).itemsize, formats.HEADER_BYTES[shard_format]
        for info in meta["splits"].values():
            size = sum((out_dir / name).stat().st_size for name in info["shards"])
            if size != info["tokens"] * itemsize + header * len(info["shards"]):
                return None
    except (OSError, KeyError, TypeError, DataError):
        return None
    return meta


def _publish(staging: Path, out_dir: Path, meta: dict) -> None:
    """Replace the directory's previous output with the staged one; meta.json goes last."""
    previous = _own_shards(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)  # from here on the directory reads as "not prepared"
    for pattern in ("train-*.bin", "val-*.bin", tokenizers.BPE_FILE):
        for old in out_dir.glob(pattern):
            old.unlink()
    for name in previous:
        (out_dir / name).unlink(missing_ok=True)
    for new in staging.iterdir():
        new.replace(out_dir / new.name)
    staging.rmdir()
    partial = out_dir / "meta.json.partial"
    partial.write_text(json.dumps(meta, indent=2) + "\n")
    partial.replace(out_dir / "meta.json")


def _own_shards(out_dir: Path) -> list[str]:
    """The llm.c-named shards an earlier prepare wrote here, by its meta.json: found by name alone they could be
    llm.c's own, which are never deleted."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        if "sources" not in meta:
            return []
        names = [name for info in meta["splits"].values() for name in info["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [name for name in names if isinstance(name, str) and Path(name).name == name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="text files (one document each), .jsonl/.json (field 'text', may be .gz) or .parquet "
                             "(column 'text'): paths, directories, globs or URLs (s3://, gs://, hf://datasets/...)")
    parser.add_argument("--out", metavar="DIR", help="local output directory")
    parser.add_argument("--index", metavar="DIR",
                        help="instead of tokenizing: write DIR/meta.json for the llm.c shards, nanoGPT train.bin "
                             "and val.bin, or build-nanogpt .npy shards in DIR (GPT-2 ids), which are read in place, "
                             "never rewritten")
    parser.add_argument("--format", choices=formats.CHOICES, metavar="FORMAT",
                        help="with INPUT: the shards to write, gpt-train (default) or llmc (llm.c's, which its "
                             "tools read too); with --index: the files to read, auto (default: detected), llmc, "
                             "nanogpt or npy")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION, metavar="F",
                        help="share of documents (or, with fewer than 1/F documents, of the tail) held out for "
                             "validation (default: %(default)s)")
    parser.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                        help="train a byte-level BPE with VOCAB ids (incl. <|endoftext|>) on the inputs instead of "
                             "using GPT-2's")
    parser.add_argument("--tokenizer", metavar="DIR_OR_FILE",
                        help="use the tokenizer of this prepared data directory (or tokenizer.bpe file) instead of "
                             "GPT-2's, so that the two directories can be mixed in one run")
    parser.add_argument("--strip-gutenberg", action="store_true",
                        help="drop Project Gutenberg license headers and footers")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help="tokens per shard file (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="encoding worker processes (default: one per core this process may use, at most one "
                             "per MB of input); 1 encodes on a single thread, with no processes to start")
    parser.add_argument("--force", action="store_true", help="redo the work even if the output is up to date")
    parser.add_argument("--bundled", action="store_true",
                        help=f"instead of INPUT: the bundled Moby-Dick with the default preset's tokenizer (a BPE "
                             f"of {BUNDLED_VOCAB} ids learned from it), as `make train` prepares it")


def run(args: argparse.Namespace) -> int:
    if args.index:
        if args.inputs or args.out or args.bundled:
            raise DataError("--index DIR reads the token files in DIR: give it no INPUT, --out or --bundled")
        index(args.index, args.format or "auto", force=args.force)
        return 0
    if args.bundled:
        # The default preset expects exactly this data: an option that would change it is refused, not dropped.
        changed = [flag for flag, given in (
            ("INPUT", args.inputs), ("--train-tokenizer", args.train_tokenizer is not None),
            ("--tokenizer", args.tokenizer),
            ("--val-fraction", args.val_fraction != VAL_FRACTION), ("--strip-gutenberg", args.strip_gutenberg),
            ("--shard-tokens", args.shard_tokens != DEFAULT_SHARD_TOKENS), ("--format", args.format)) if given]
        if changed:
            raise DataError(f"--bundled prepares the default preset's data, which {', '.join(changed)} would change: "
                            f"give --bundled with --out (and --workers, --force) only, or the corpus ({bundled_corpus()}) as INPUT with your options")
        if not args.out:
            raise DataError("--bundled needs --out DIR")
        prepare_bundled(args.out, workers=args.workers, force=args.force)
        return 0
    if not args.inputs or not args.out:
        raise DataError("give INPUT... and --out DIR (or --index DIR, for llm.c or nanoGPT token files)")
    prepare(args.inputs, args.out, val_fraction=args.val_fraction, train_tokenizer=args.train_tokenizer,
            strip_gutenberg=args.strip_gutenberg, shard_tokens=args.shard_tokens, workers=args.workers,
            force=args.force, shard_format=formats.NATIVE if args.format in (None, "auto") else args.format,
            tokenizer=args.tokenizer)
    return 0
