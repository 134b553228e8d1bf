"""Tokenizers: OpenAI's GPT-2 BPE, built offline from files we ship, or a byte-level BPE trained on the user's corpus.

Both are plain `tiktoken.Encoding`s, so prepared data and checkpoints encode and decode with the same fast code.
Why not `tiktoken.get_encoding("gpt2")`: it downloads on first use (compute nodes often have no internet) and
caches in a temp directory we do not control. We rebuild the identical ranks from `gpt_train/assets`.

A tokenizer's identity is a sha256 over its ranks, pattern and special tokens, serialized the way `save` writes
them. Data directories and checkpoints record it, so a model is never fed ids from a different vocabulary.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import fsspec
import numpy as np
import tiktoken

from gpt_train.errors import DataError

ENDOFTEXT = "<|endoftext|>"
BPE_FILE = "tokenizer.bpe"  # the name a custom tokenizer has inside a prepared data directory
_FORMAT = "gpt-train-bpe/1"
_ASSETS = Path(__file__).resolve().parent / "assets"

# As tiktoken_ext/openai_public.py defines gpt2: equivalent to the original GPT-2 regex, but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# tiktoken runs GPT-2's pattern on fancy_regex's backtracking engine because of one lookahead, `\s+(?!\S)`: a
# run of two or more white-space characters before a non-space leaves its last character to the pre-token
# after it. We mark that place with a NUL, which this pattern (no lookahead, so the regex crate's automaton
# runs it) makes a pre-token of its own, and drop NUL's id afterwards: the same ids, 1.5x faster. Text that
# holds a NUL of its own takes the original pattern.
GPT2_PATTERN_MARKED = r"""\x00|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}\x00]+|\s+"""
# Unicode White_Space, which is what `\s` means to the regex crate (Python's str.isspace adds \x1c-\x1f).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_IS_SPACE = np.zeros(ord(max(_WHITE_SPACE)) + 2, bool)  # the last entry stands for every higher code point
_IS_SPACE[[ord(c) for c in _WHITE_SPACE]] = True
# tiktoken's published hashes of OpenAI's files; ours must match byte for byte.
GPT2_ASSET_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# rustbpe holds this many texts at once; our texts are pieces of up to ~1 MB, so this bounds its memory.
_TRAIN_BUFFER_TEXTS = 64


class Tokenizer:
    """A tiktoken Encoding plus the name and hash that data directories and checkpoints record."""

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int]):
        self.name = name
        self.pattern = pattern
        self.ranks = ranks
        self.special_tokens = special_tokens
        self._encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self._marked_encoding = (tiktoken.Encoding(name, pat_str=GPT2_PATTERN_MARKED, mergeable_ranks=ranks,
                                                   special_tokens=special_tokens)
                                 if pattern == GPT2_PATTERN else None)
        self.n_vocab: int = self._encoding.n_vocab
        self.eot: int = special_tokens[ENDOFTEXT]
        self.sha256: str = hashlib.sha256(_serialize(pattern, ranks, special_tokens)).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; a literal "<|endoftext|>" in it is ordinary text, never the special token."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as uint32 numpy ids, without building a Python int per token (prepare's hot path)."""
        try:
            return self._encode_array(text)
        except UnicodeEncodeError:  # lone surrogates (JSON can carry them): what tiktoken's encode_ordinary does
            return self._encode_array(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _encode_array(self, text: str) -> np.ndarray:
        if self._marked_encoding is None or "\x00" in text:
            return self._encoding.encode_to_numpy(text, disallowed_special=())
        chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        space = _IS_SPACE[np.minimum(chars, len(_IS_SPACE) - 1)]
        # before the last character of each run of 2+ white spaces that a non-space follows
        marks = np.flatnonzero(space[:-2] & space[1:-1] & ~space[2:]) + 1
        if not len(marks):
            return self._marked_encoding.encode_to_numpy(text, disallowed_special=())
        marked = np.insert(chars, marks, 0).tobytes().decode("utf-32-le")
        ids = self._marked_encoding.encode_to_numpy(marked, disallowed_special=())
        return ids[ids != self.ranks[b"\x00"]]

    def decode(self, ids: Sequence[int]) -> str:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors: tiktoken wants Python ints
            ids = ids.tolist()
        return self._encoding.decode(ids)

    def __reduce__(self) -> tuple:
        # Pickled (for prepare's worker processes) as its parts: the ranks once, not once per tiktoken Encoding.
        return Tokenizer, (self.name, self.pattern, self.ranks, self.special_tokens)

    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "n_vocab": self.n_vocab, "eot": self.eot}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, sha256={self.sha256[:12]}...)"


def _serialize(pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> bytes:
    """The `save` file format: one JSON header line, then tiktoken's "base64-token rank" lines in rank order."""
    header = json.dumps({"format": _FORMAT, "pattern": pattern, "special_tokens": special_tokens}, sort_keys=True)
    lines = [header.encode()]
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    lines += [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in by_rank]
    return b"\n".join(lines) + b"\n"


def gpt2(assets_dir: str | Path | None = None) -> Tokenizer:
    """OpenAI's GPT-2 tokenizer (50257 ids, <|endoftext|> = 50256), with no network access."""
    return _gpt2(Path(assets_dir) if assets_dir else _ASSETS)


@functools.lru_cache(maxsize=2)
def _gpt2(assets_dir: Path) -> Tokenizer:
    contents = {}
    for filename, expected in GPT2_ASSET_SHA256.items():
        path = assets_dir / filename
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"GPT-2 tokenizer file {path} cannot be read ({e.strerror}); reinstall gpt-train") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DataError(f"GPT-2 tokenizer file {path} is corrupted: sha256 {actual}, expected {expected}; "
                            "reinstall gpt-train")
        contents[filename] = data
    ranks = _data_gym_ranks(contents["vocab.bpe"].decode(), json.loads(contents["encoder.json"]))
    return Tokenizer("gpt2", GPT2_PATTERN, ranks, {ENDOFTEXT: len(ranks)})


def _data_gym_ranks(vocab_bpe: str, encoder: dict[str, int]) -> dict[bytes, int]:
    """tiktoken.load.data_gym_to_mergeable_bpe_ranks on in-memory contents: that one reads through a cache it
    writes to the system temp directory, even for local files."""
    # GPT-2 spells each byte as a printable character: printable Latin-1 bytes as themselves, the others
    # (control characters, space, ...) as chr(256 + n) in byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_order = printable + [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})

    def to_bytes(word: str) -> bytes:
        return bytes(char_to_byte[c] for c in word)

    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    for merge in vocab_bpe.split("\n")[1:-1]:  # a version line first, a newline last
        first, second = merge.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    # The merge order must be the id order of encoder.json, else ids would differ from OpenAI's.
    expected = {to_bytes(word): i for word, i in encoder.items() if word != ENDOFTEXT}
    if ranks != expected:
        raise DataError("GPT-2 tokenizer files vocab.bpe and encoder.json disagree; reinstall gpt-train")
    return ranks


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE learned from `texts` (rustbpe, GPT-4 split pattern); `vocab_size` counts <|endoftext|>,
    which is the last id. A corpus with fewer distinct pairs than merges asked for gives a smaller vocabulary."""
    if vocab_size < 257:
        raise DataError(f"tokenizer vocabulary size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    try:
        import rustbpe
    except ImportError:
        raise DataError("training a tokenizer needs rustbpe: pip install rustbpe") from None
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1, buffer_size=_TRAIN_BUFFER_TEXTS)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return Tokenizer("bpe", trainer.get_pattern(), ranks, {ENDOFTEXT: len(ranks)})


def save(tok: Tokenizer, path: str | Path) -> None:
    """Write a tokenizer as text (no pickle: loading a data directory must never run code)."""
    with fsspec.open(str(path), "wb") as f:
        f.write(_serialize(tok.pattern, tok.ranks, tok.special_tokens))


def load_file(path: str | Path) -> Tokenizer:
    """Read a tokenizer that `save` wrote (a local path or an fsspec URL)."""
    try:
        with fsspec.open(str(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"tokenizer file {path} not found") from None
    header_line, _, body = data.partition(b"\n")
    try:
        header = json.loads(header_line)
        if header.get("format") != _FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {_FORMAT!r}")
        ranks = {}
        for line in body.splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        return Tokenizer("bpe", header["pattern"], ranks, header["special_tokens"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"tokenizer file {path} is not a gpt-train tokenizer: {e}") from None


def from_identity(identity: dict, data_dir: str | None) -> Tokenizer:
    """The tokenizer a data directory's meta.json or a checkpoint recorded, checked against its hash."""
    name = identity.get("name")
    if name == "gpt2":
        tok = gpt2()
    elif name == "bpe":
        if not data_dir:
            raise DataError("this data was made with a custom tokenizer; its data directory is needed to load it")
        tok = load_file(f"{str(data_dir).rstrip('/')}/{BPE_FILE}")
    else:
        raise DataError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'bpe'")
    if tok.sha256 != identity.get("sha256"):
        where = "the GPT-2 assets" if name == "gpt2" else f"{data_dir}/{BPE_FILE}"
        raise DataError(f"tokenizer in {where} (sha256 {tok.sha256[:12]}...) is not the one the data or checkpoint "
                        f"was made with (sha256 {str(identity.get('sha256'))[:12]}...); re-run `gpt-train prepare`")
    return tok
