"""Batches from prepared token shards, drawn deterministically from (seed, sample index).

A run consumes a single global stream of samples: sample k is a fixed window of the shards,
chosen by a per-epoch permutation seeded with (seed, epoch). Optimizer step s uses samples
[s*G, (s+1)*G) for a global batch of G sequences, and each rank takes its contiguous share of
them. So the order of tokens does not depend on how many ranks there are, and the loader's only
state is the index of the next sample: a checkpoint written by 4 ranks resumes on 1 or 8.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gpt_train import formats, remote
from gpt_train.config import DataConfig
from gpt_train.errors import CheckpointError, DataError

FORMAT = formats.META_FORMAT
TRACE_VAR = "GPT_TRAIN_TRACE_BATCHES"  # tests: a folder where each rank records the sequences of every step


def read_meta(data_dir: str, data_format: str = "auto") -> dict:
    """The description of a data directory: its meta.json, or, where it has none, that of the llm.c, nanoGPT or
    build-nanogpt token files in it (`data_format` auto, llmc, nanogpt or npy; gpt-train needs a meta.json). A named format
    must be what the directory holds."""
    if data_format not in formats.CHOICES:
        raise DataError(f"data.format {data_format!r} is none of {', '.join(formats.CHOICES)}")
    if remote.is_remote(data_dir):
        path: str | Path = f"{data_dir.rstrip('/')}/meta.json"
        text = remote.read_meta_text(data_dir)
    else:
        root = Path(data_dir.removeprefix("file://"))
        path = root / "meta.json"
        if not path.is_file():
            found = formats.detect(root) if data_format == "auto" else data_format
            if found in (None, formats.NATIVE):
                raise DataError(f"no prepared data in '{data_dir}' (missing {path.name}): run `gpt-train prepare "
                                f"INPUT... --out {data_dir}`, or `gpt-train prepare --index {data_dir}` for llm.c, "
                                "nanoGPT or build-nanogpt token files")
            return formats.describe(root, found)
        text = path.read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON ({e.msg}): run `gpt-train prepare --force`") from None
    if not isinstance(meta, dict):
        raise DataError(f"'{path}' must be a JSON object, not a {type(meta).__name__}: run `gpt-train prepare --force`")
    if meta.get("format") != FORMAT:
        raise DataError(f"'{path}' has format {meta.get('format')!r}, expected {FORMAT!r}: prepare the data again")
    # What training reads of it, checked now: a hand-edited file is this one line, not a KeyError later.
    def bad(problem: str) -> DataError:
        return DataError(f"'{path}' has {problem}: run `gpt-train prepare --force`")

    shard_format = formats.of(meta)
    if shard_format not in formats.FORMATS:
        raise bad(f"shard_format {shard_format!r}; gpt-train reads {', '.join(formats.FORMATS)}")
    if data_format not in ("auto", shard_format):
        raise DataError(f"'{path}' describes {shard_format} token files, but data.format is {data_format}")
    if meta.get("header_bytes", 0) != formats.HEADER_BYTES[shard_format]:
        raise bad(f"header_bytes {meta.get('header_bytes')!r}; {shard_format} files have "
                  f"{formats.HEADER_BYTES[shard_format]}")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise bad("no 'tokenizer' object")
    n_vocab = tokenizer.get("n_vocab")
    if type(n_vocab) is not int or n_vocab < 1:  # not isinstance: True is an int
        raise bad(f"tokenizer n_vocab {n_vocab!r}, not a positive integer")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"token dtype {meta.get('dtype')!r}; gpt-train writes uint16 or uint32")
    if shard_format == formats.NANOGPT and meta["dtype"] != "uint16":
        raise bad(f"token dtype {meta['dtype']!r}; nanoGPT's files hold uint16")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise bad("no 'splits' object")
    for name, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(isinstance(shard, str) for shard in shards):
            raise bad(f"no list of shards for the '{name}' split")
    return meta


def bits_per_byte(loss_nats_per_token: float, meta: dict, split: str = "val") -> float | None:
    """A loss in bits per byte of text: comparable across tokenizers, where nats per token are not. The ratio
    of tokens to bytes is the whole split's (a val loss measured on part of it is taken as the split's). None
    where meta.json does not know the split's bytes of text (prepared before gpt-train recorded them)."""
    info = meta.get("splits", {}).get(split)
    tokens, text_bytes = (info.get("tokens"), info.get("text_bytes")) if isinstance(info, dict) else (None, None)
    if type(tokens) is not int or type(text_bytes) is not int or text_bytes <= 0:
        return None
    return loss_nats_per_token / math.log(2) * tokens / text_bytes


class Split:
    """One split (train or val) of a prepared directory: its shards as read-only memmaps, or on object storage
    as `remote.RemoteShard`s read through `cache` (the process's default cache in DataConfig's place if None)."""

    def __init__(self, data_dir: str, split: str, seq_len: int, data_format: str = "auto",
                 cache: remote.Cache | None = None):
        meta = read_meta(data_dir, data_format)
        if split not in meta["splits"]:
            raise DataError(f"'{data_dir}' has no '{split}' split (has: {', '.join(meta['splits'])})")
        dtype = np.dtype(meta["dtype"])
        shard_format = formats.of(meta)
        n_vocab = meta["tokenizer"]["n_vocab"]
        info = meta["splits"][split]
        # An id past the vocabulary would index outside the embedding at whichever step drew it. prepare records
        # the largest id of a split; for data prepared before it did, and foreign files read without `prepare
        # --index`, every local shard is read once per start (about 0.05 s per GB from the page cache, the disk's
        # read speed otherwise). A remote one is not: that would download the whole split at every start.
        recorded = info.get("max_id")
        self.remote = remote.is_remote(data_dir)
        if self.remote:
            if not isinstance(recorded, int):
                fix = ("prepare it again with `gpt-train prepare --force`, which records it" if shard_format == formats.NATIVE
                       else "run `gpt-train prepare --index` on a local copy and upload its meta.json beside the shards")
                raise DataError(f"'{data_dir}/meta.json' records no max_id of the '{split}' split, which reading it "
                                f"from object storage needs (else every start would download every shard): {fix}")
            self.shards: list[np.ndarray] | list[remote.RemoteShard] = remote.open_shards(
                data_dir, info["shards"], shard_format, dtype,
                cache or remote.cache_at(DataConfig.cache_dir, DataConfig.cache_gb))
        else:
            root = Path(data_dir.removeprefix("file://"))
            self.shards = []
            for name in info["shards"]:
                path = root / name
                if not path.is_file():
                    raise DataError(f"shard '{path}' listed in meta.json is missing: run `gpt-train prepare --force`")
                self.shards.append(formats.open_tokens(path, shard_format, dtype))
        for name, shard in zip(info["shards"], self.shards):
            top = recorded if isinstance(recorded, int) else int(shard.max(initial=0))
            if top >= n_vocab:
                where = f"the '{split}' split of '{data_dir}' (meta.json)" if isinstance(recorded, int) else f"shard '{root / name}'"
                fix = ("the shards and meta.json do not belong together; run `gpt-train prepare --force`"
                       if shard_format == formats.NATIVE else f"these {shard_format} files hold the ids of another "
                       "tokenizer, which gpt-train cannot read them with")
                raise DataError(f"{where} holds token id {top}, outside the vocabulary of {n_vocab} of tokenizer "
                                f"{meta['tokenizer'].get('name')!r}: {fix}")
        self.seq_len = seq_len
        # A window holds seq_len inputs plus the one-token-shifted target, inside one shard.
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            tokens = sum(len(s) for s in self.shards)
            raise DataError(f"the '{split}' split of '{data_dir}' has {tokens} tokens, fewer than one sequence "
                            f"of {seq_len + 1}: use more data or a smaller train.seq_len")
        self.tokens = sum(len(s) for s in self.shards)
        if isinstance(info.get("tokens"), int) and self.tokens != info["tokens"]:
            raise DataError(f"the '{split}' shards of '{data_dir}' hold {self.tokens:,} tokens but meta.json says "
                            f"{info['tokens']:,}: a shard was cut short or replaced; run `gpt-train prepare --force`")

    def _locate(self, w: int) -> tuple[int, int]:
        """(shard, first id) of window w."""
        shard = int(np.searchsorted(self.starts, w, side="right")) - 1
        return shard, (w - int(self.starts[shard])) * self.seq_len

    def window(self, w: int) -> np.ndarray:
        shard, offset = self._locate(w)
        return self.shards[shard][offset : offset + self.seq_len + 1]

    def prefetch(self, indices) -> None:
        """Start fetching what windows `indices` need from object storage, so that reading them later does not wait
        on the network; a no-op on local shards, which the page cache reads ahead."""
        if self.remote:
            for w in indices:
                shard, offset = self._locate(int(w))
                self.shards[shard].prefetch(offset, offset + self.seq_len + 1)

    def windows(self, indices) -> torch.Tensor:
        self.prefetch(indices)  # remote blocks fetched side by side, not one window after the other
        rows = np.stack([self.window(int(w)) for w in indices]).astype(np.int64)  # (B, T+1)
        return torch.from_numpy(rows)


@lru_cache(maxsize=8)
def _permutation(num_windows: int, seed: tuple[int, ...], epoch: int) -> np.ndarray:
    return np.random.default_rng([*seed, epoch]).permutation(num_windows)


class Shuffled:
    """A split as an endless stream of samples: sample k is window perm[k mod N] of epoch k // N, the
    permutation seeded with (seed, *salt, epoch). A mixture salts each source's stream with its index."""

    def __init__(self, split: Split, seed: int, salt: tuple[int, ...] = ()):
        self.split, self.seed = split, (seed, *salt)
        self.seq_len = split.seq_len

    def window_of(self, k: int) -> int:
        epoch, j = divmod(k, self.split.num_windows)
        return int(_permutation(self.split.num_windows, self.seed, epoch)[j])

    def prefetch(self, samples) -> None:
        self.split.prefetch(self.window_of(k) for k in samples)

    def rows(self, samples) -> torch.Tensor:
        """Samples `samples` as (len(samples), T+1) token ids."""
        return self.split.windows([self.window_of(k) for k in samples])

    def epochs(self, samples: int) -> float:
        """Passes over the split that the first `samples` samples make."""
        return samples / self.split.num_windows

    def samples_per_epoch(self) -> float:
        return float(self.split.num_windows)


class Loader:
    """Training batches for one rank from a sample stream (`Shuffled`, or a `mixture.Mixture`); `next_sample`
    (global, rank-independent) is its whole state.

    With `prefetch`, the batch after the one handed out is gathered from the memmaps on a background thread
    while the step runs (into pinned memory with `pin`, so that the copy to the GPU does not block). It is
    keyed by its position: the state stays the position of the batches consumed, whatever was read ahead.
    `trace` (tests: GPT_TRAIN_TRACE_BATCHES) appends a hash of every sequence each step hands out to a file."""

    def __init__(self, stream, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 prefetch: bool = False, pin: bool = False, trace: str | None = None):
        assert global_batch % (micro_batch * world_size) == 0, "chosen by config.micro_batch_for"
        self.stream = stream
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.next_sample = 0
        self.pin, self.trace = pin, trace
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if prefetch else None
        self._ahead: tuple[int, Future] | None = None

    def state_dict(self) -> dict:
        return {"next_sample": self.next_sample, "seq_len": self.stream.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.stream.seq_len:
            raise CheckpointError(f"the checkpoint was trained with seq_len {state['seq_len']}, the config says "
                                  f"{self.stream.seq_len}: its token stream cannot continue; start a new run with "
                                  "checkpoint.init_from=<that checkpoint>")
        self.next_sample = state["next_sample"]

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def batch_at(self, sample: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the optimizer step whose global batch starts at sample `sample`:
        [(x, y)], each (micro_batch, T)."""
        first = sample + self.rank * (self.global_batch // self.world_size)
        # The whole step's windows at once: blocks on object storage come side by side (a no-op on local shards).
        self.stream.prefetch(range(first, first + self.global_batch // self.world_size))
        micro = []
        for m in range(self.accum_steps):
            lo = first + m * self.micro_batch
            rows = self.stream.rows(range(lo, lo + self.micro_batch))
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each
            micro.append((x.pin_memory(), y.pin_memory()) if self.pin else (x, y))
        return micro

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of the next optimizer step, and the position moved past them."""
        ahead = self._ahead
        micro = ahead[1].result() if ahead and ahead[0] == self.next_sample else self.batch_at(self.next_sample)
        if self.trace:
            self._record(micro)
        self.next_sample += self.global_batch
        if self._pool:
            self._ahead = (self.next_sample, self._pool.submit(self.batch_at, self.next_sample))
        return micro

    def _record(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        rows = [hashlib.sha1(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()[:12]
                for x, y in micro for a, b in zip(x, y)]
        with open(Path(self.trace) / f"rank-{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"sample": self.next_sample, "world_size": self.world_size, "rows": rows}) + "\n")

    @property
    def epoch(self) -> float:
        return self.stream.epochs(self.next_sample)


def eval_batches(split: Split, batches: int, micro_batch: int, rank: int, world_size: int):
    """A fixed, ordered subset of the split, so that every evaluation measures the same tokens."""
    total = min(batches * micro_batch, split.num_windows)
    total -= total % world_size  # the same number of batches on every rank: a sharded forward needs them all
    mine = list(range(rank, total, world_size))
    for i in range(0, len(mine), micro_batch):
        rows = split.windows(mine[i : i + micro_batch])
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def fingerprint(meta: dict) -> str:
    """The identity of a prepared directory's token stream, from its meta.json: the same for a copy moved
    elsewhere, different when it was prepared again from other input or with other options, or when other
    foreign files lie in place of indexed ones. Keys added since the first version count only where present,
    so that the data of existing checkpoints keeps its fingerprint."""
    def split_identity(split: dict) -> list:
        return [split["shards"], split.get("tokens"), *([split["sample_sha256"]] if "sample_sha256" in split else [])]

    identity = {
        "tokenizer": meta["tokenizer"].get("sha256"), "dtype": meta["dtype"],
        "splits": {name: split_identity(split) for name, split in meta["splits"].items()},
        "sources": [(Path(src["path"]).name, src.get("bytes")) for src in meta.get("sources", [])],
        "val_fraction": meta.get("val_fraction"), "options": meta.get("options"),
    }
    if formats.of(meta) != formats.NATIVE:
        identity["shard_format"] = formats.of(meta)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
