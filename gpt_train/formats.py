"""The token files a data directory can hold: how each is recognized, checked and memory-mapped in place, and the
names and headers `gpt-train prepare` writes.

- gpt-train: `prepare`'s own shards, `train-00000.bin`, ...: bare ids, uint16 or uint32 as meta.json says.
- llmc: llm.c's shards, `NAME_train_000001.bin` and `NAME_val_000000.bin` (or `NAME_train.bin`): 256 little-endian
  int32 (magic, version, number of tokens, then zeros), then the ids. Magic 20240520 with version 1 holds uint16
  ids (GPT-2's), 20240801 with version 7 uint32 (Llama 3's), as llm.c's dev/data/data_common.py writes them.
- nanogpt: nanoGPT's `train.bin` and `val.bin`: bare uint16 GPT-2 ids.
- npy: build-nanogpt's shards, `NAME_train_000001.npy` and `NAME_val_000000.npy`: `np.save` of a 1-D uint16 (or
  uint32) array, whose header numpy pads to 128 bytes for such an array.

Foreign files are never copied or rewritten: they are read where they lie, past their header. A directory without
meta.json is recognized by its file names and llm.c's and numpy's magic numbers (`describe`); `gpt-train prepare --index` adds
what takes a full read (the largest id, the bytes of text) and writes that description as meta.json.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import numpy as np

from gpt_train import tokenizer as tokenizers
from gpt_train.errors import DataError

META_FORMAT = "gpt-train-tokens/1"  # meta.json's "format": the version of the description, whatever the files
NATIVE, LLMC, NANOGPT, NPY = "gpt-train", "llmc", "nanogpt", "npy"
FORMATS = (NATIVE, LLMC, NANOGPT, NPY)  # meta.json's "shard_format"; absent means gpt-train (data prepared before it)
CHOICES = ("auto", *FORMATS)  # what a reader may ask for: auto takes meta.json's, or what the files are
HEADER_BYTES = {NATIVE: 0, LLMC: 256 * 4, NANOGPT: 0, NPY: 128}
LLMC_MAGIC = {20240520: (1, np.dtype(np.uint16)), 20240801: (7, np.dtype(np.uint32))}  # magic: (version, ids)
LLMC_MAX_TOKENS = 2**31 - 1  # the header's count is an int32
NPY_MAGIC = b"\x93NUMPY"
NPY_DTYPES = {"<u2": np.dtype(np.uint16), "<u4": np.dtype(np.uint32)}
# Names of the split files of llm.c (fineweb_train_000001.bin, tiny_shakespeare_val.bin), nanoGPT (train.bin) and
# build-nanogpt (edufineweb_train_000001.npy).
_SPLIT_FILE = re.compile(r"(?:^|_)(train|val)(?:_\d+)?\.(bin|npy)$")
_SAMPLE_BYTES = 1 << 16


def of(meta: dict) -> str:
    return meta.get("shard_format", NATIVE)


def shard_name(shard_format: str, split: str, index: int) -> str:
    """The name `prepare` gives a shard it writes; llm.c's tools take `DIR/*_train_*.bin` and `DIR/*_val_*.bin`."""
    return f"data_{split}_{index:06d}.bin" if shard_format == LLMC else f"{split}-{index:05d}.bin"


def llmc_header(count: int, dtype: np.dtype) -> bytes:
    magic = next(m for m, (_, ids) in LLMC_MAGIC.items() if ids == dtype)
    header = np.zeros(HEADER_BYTES[LLMC] // 4, "<i4")
    header[:3] = magic, LLMC_MAGIC[magic][0], count
    return header.tobytes()


def count_tokens(path: Path, shard_format: str, dtype: np.dtype) -> tuple[np.dtype, int]:
    """(id type, number of ids) of one file, its header checked against its size; `dtype` is the type of bare
    files, an llm.c header gives its own. A failed check is one line naming the file and what does not add up."""
    head = b""
    if HEADER_BYTES[shard_format]:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES[shard_format])
    return parse_header(str(path), shard_format, dtype, path.stat().st_size, head)


def parse_header(name: str, shard_format: str, dtype: np.dtype, size: int, head: bytes) -> tuple[np.dtype, int]:
    """`count_tokens` of a file named `name` of `size` bytes that starts with `head` (at least its header): the
    same checks for a local file and for an object read by a ranged request."""
    if shard_format == NPY:
        return _parse_npy(name, size, head)
    if shard_format != LLMC:
        if size % dtype.itemsize:
            raise DataError(f"shard '{name}' is truncated (size not a multiple of {dtype.itemsize} bytes)")
        return dtype, size // dtype.itemsize
    header_bytes = HEADER_BYTES[LLMC]
    if size < header_bytes or len(head) < header_bytes:
        raise DataError(f"{name}: {size} bytes, shorter than llm.c's {header_bytes}-byte header")
    magic, version, count = (int(v) for v in np.frombuffer(head[:header_bytes], "<i4")[:3])
    if magic not in LLMC_MAGIC:
        known = ", ".join(f"{m} for {ids.name}" for m, (_, ids) in LLMC_MAGIC.items())
        raise DataError(f"{name}: magic number {magic} is not llm.c's ({known} tokens)")
    expected, found = LLMC_MAGIC[magic]
    if version != expected:
        raise DataError(f"{name}: version {version} with magic {magic}; llm.c writes version {expected} with it "
                        f"({found.name} tokens)")
    if count < 0:
        raise DataError(f"{name}: header says {count} tokens")
    body = size - header_bytes
    if count * found.itemsize != body:
        raise DataError(f"{name}: header says {count} tokens ({count * found.itemsize} bytes) but the file holds "
                        f"{body} bytes after its {header_bytes}-byte header")
    return found, count


def _parse_npy(name: str, size: int, head: bytes) -> tuple[np.dtype, int]:
    """A .npy file's header, read as data (ast.literal_eval, never a pickle): version 1.0, a little-endian
    uint16 or uint32 array of one dimension in C order, the ids right after the 128 bytes numpy pads it to."""
    header_bytes = HEADER_BYTES[NPY]
    if size < header_bytes or len(head) < header_bytes or not head.startswith(NPY_MAGIC):
        raise DataError(f"{name}: not a .npy file of token ids (no numpy magic in its first {header_bytes} bytes)")
    major, minor, length = head[6], head[7], int.from_bytes(head[8:10], "little")
    if (major, minor) != (1, 0) or 10 + length != header_bytes:
        raise DataError(f"{name}: a .npy header of version {major}.{minor} and {10 + length} bytes; gpt-train reads "
                        f"the version 1.0, {header_bytes}-byte header that np.save writes for a 1-D array")
    try:
        header = ast.literal_eval(head[10:header_bytes].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise DataError(f"{name}: its .npy header does not read as numpy's") from None
    if descr not in NPY_DTYPES or fortran or not (isinstance(shape, tuple) and len(shape) == 1):
        raise DataError(f"{name}: holds an array of {descr} and shape {shape}; gpt-train reads 1-D arrays of "
                        f"{' or '.join(NPY_DTYPES)} (uint16 or uint32 token ids)")
    dtype, count = NPY_DTYPES[descr], int(shape[0])
    if count * dtype.itemsize != size - header_bytes:
        raise DataError(f"{name}: its header says {count} tokens ({count * dtype.itemsize} bytes) but the file holds "
                        f"{size - header_bytes} bytes after its {header_bytes}-byte header")
    return dtype, count


def check_dtype(name: str, found: np.dtype, dtype: np.dtype) -> None:
    if found != dtype:
        raise DataError(f"{name} holds {found.name} tokens but meta.json says {dtype.name}: the shards and meta.json "
                        "do not belong together; run `gpt-train prepare --index` again")


def open_tokens(path: Path, shard_format: str, dtype: np.dtype) -> np.ndarray:
    """The ids of one file as a read-only memmap past its header, checked as `count_tokens` does."""
    found, count = count_tokens(path, shard_format, dtype)
    check_dtype(str(path), found, dtype)
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES[shard_format], shape=(count,))


def _split_files(root: Path, suffix: str = "bin") -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {"train": [], "val": []}
    if root.is_dir():
        for path in sorted(root.iterdir()):  # llm.c numbers its shards with zero padding: name order is their order
            match = _SPLIT_FILE.search(path.name)
            if match and match.group(2) == suffix and path.is_file():
                files[match.group(1)].append(path)
    return files


def _has_llmc_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) in LLMC_MAGIC


def detect(root: Path) -> str | None:
    """The format of the foreign token files in `root` (llmc, nanogpt or npy), None when it holds none."""
    files = [path for paths in _split_files(root).values() for path in paths]
    if not files:
        return NPY if any(_split_files(root, "npy").values()) else None
    bare = [path for path in files if not _has_llmc_magic(path)]
    if bare and len(bare) == len(files) and all(path.name in ("train.bin", "val.bin") for path in bare):
        return NANOGPT
    return LLMC  # a file named like an llm.c shard but without its magic fails describe's check, which says so


def describe(root: Path, shard_format: str) -> dict:
    """The meta.json of the llmc, nanogpt or npy files in `root`, from their headers and sizes alone: what
    training needs to read them; `prepare --index` adds each split's largest id and bytes of text."""
    files = _split_files(root, "npy" if shard_format == NPY else "bin")
    if shard_format == NANOGPT:
        files = {split: [path for path in paths if path.name == f"{split}.bin"] for split, paths in files.items()}
        if (root / "meta.pkl").exists():  # nanoGPT's character-level datasets: ids of their own vocabulary
            raise DataError(f"'{root}' holds nanoGPT's meta.pkl, so its ids are of a character vocabulary, not "
                            "GPT-2's: gpt-train reads nanoGPT data tokenized with GPT-2 only")
    pattern = {LLMC: "*_{}_*.bin", NPY: "*_{}_*.npy"}.get(shard_format, "{}.bin")
    missing = [pattern.format(split) for split, paths in files.items() if not paths]
    if missing:
        raise DataError(f"'{root}' has no {' and no '.join(missing)} ({shard_format} files): training needs a train "
                        "and a val split")
    dtypes: dict[np.dtype, Path] = {}
    splits = {}
    for split, paths in files.items():
        tokens = 0
        for path in paths:
            dtype, count = count_tokens(path, shard_format, np.dtype(np.uint16))
            dtypes.setdefault(dtype, path)
            tokens += count
        splits[split] = {"shards": [path.name for path in paths], "tokens": tokens, "sample_sha256": _sample(paths)}
    if len(dtypes) > 1:
        (a, first), (b, second) = dtypes.items()
        raise DataError(f"'{root}' mixes {a.name} ids ({first.name}) and {b.name} ids ({second.name}): one directory "
                        "holds one tokenization")
    bpe = root / tokenizers.BPE_FILE  # ours, in llm.c shards we wrote with a trained tokenizer
    tok = tokenizers.load_file(bpe) if bpe.is_file() else tokenizers.gpt2()
    return {"format": META_FORMAT, "shard_format": shard_format, "header_bytes": HEADER_BYTES[shard_format],
            "tokenizer": tok.identity(), "dtype": next(iter(dtypes)).name, "splits": splits}


def _sample(paths: list[Path]) -> str:
    """A hash of each file's name, size, first and last 64 KiB. Foreign files have no recorded source, so this is
    what tells another dataset cut into shards of the same names and sizes from this one (a change inside a shard
    that keeps its size goes unnoticed: hashing all of it would read every byte at every start)."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        with open(path, "rb") as f:
            digest.update(path.name.encode() + size.to_bytes(8, "little") + f.read(_SAMPLE_BYTES))
            f.seek(max(size - _SAMPLE_BYTES, 0))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]
