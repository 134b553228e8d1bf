"""The corpus a run reads: one prepared folder (data.dir) or a weighted mixture of several (data.sources).

A mixture is still one global stream of samples, so everything data.py promises holds: sample k depends only
on (seed, k), never on the number of ranks, and the loader's position is its whole state. The stream is cut
into blocks of BLOCK samples. Every block holds each source's exact share of it (largest remainders of the
weights, the same in every block), placed in an order drawn from (seed, block). The j-th sample a source
contributes to the stream is sample j of that source's own shuffled stream (data.Shuffled, salted with the
source's index), so each source runs through its epochs as if it were trained alone, at its own pace.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch

from gpt_train import data, remote
from gpt_train.config import DataConfig, Source
from gpt_train.errors import ConfigError, DataError

BLOCK = 1024  # samples per block: each weight is exact to 1/BLOCK, and within every BLOCK consecutive samples
_MIX_SALT = 0x6D6978  # keeps the block orders' seeds apart from the sources' permutations


def apportion(weights: list[float], block: int = BLOCK) -> list[int]:
    """Samples per block for each weight: the largest-remainder split of `block`, ties to the earlier source."""
    total = sum(weights)
    quotas = [w / total * block for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: block - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    """Sample streams of several splits interleaved by `counts` per block (see the module's docstring); the
    same interface as data.Shuffled."""

    def __init__(self, streams: list[data.Shuffled], counts: list[int], seed: int):
        self.streams, self.counts, self.seed = streams, counts, seed
        self.seq_len = streams[0].seq_len

    @lru_cache(maxsize=4)  # noqa: B019 - a few blocks per step, and the mixture lives as long as the run
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """For each position of a block: its source, and how many samples of that source come before it."""
        source = np.random.default_rng([self.seed, _MIX_SALT, block]).permutation(
            np.repeat(np.arange(len(self.counts)), self.counts))
        before = np.empty(BLOCK, dtype=np.int64)
        for s in range(len(self.counts)):
            mine = np.flatnonzero(source == s)
            before[mine] = np.arange(len(mine))
        return source, before

    def locate(self, k: int) -> tuple[int, int]:
        """(source, index in that source's stream) of sample k."""
        block, position = divmod(k, BLOCK)
        source, before = self._block(block)
        s = int(source[position])
        return s, block * self.counts[s] + int(before[position])

    def _by_source(self, samples) -> dict[int, list[tuple[int, int]]]:
        out: dict[int, list[tuple[int, int]]] = {}
        for i, k in enumerate(samples):
            s, j = self.locate(k)
            out.setdefault(s, []).append((i, j))
        return out

    def prefetch(self, samples) -> None:
        for s, places in self._by_source(samples).items():
            self.streams[s].prefetch(j for _, j in places)

    def rows(self, samples) -> torch.Tensor:
        samples = list(samples)
        out = torch.empty(len(samples), self.seq_len + 1, dtype=torch.int64)  # (B, T+1)
        for s, places in self._by_source(samples).items():
            out[[i for i, _ in places]] = self.streams[s].rows([j for _, j in places])
        return out

    def epochs(self, samples: int) -> float:
        """Passes over the source that is repeated most."""
        return max(stream.epochs(samples * c / BLOCK) for stream, c in zip(self.streams, self.counts))

    def samples_per_epoch(self) -> float:
        """The samples after which `epochs` is 1: a source drawn c times per BLOCK samples is passed over
        once in its windows x BLOCK / c samples; the first source to get there ends the pass."""
        return min(stream.samples_per_epoch() * BLOCK / c for stream, c in zip(self.streams, self.counts))


class Corpus:
    """The prepared folders of data.sources (or data.dir alone), described and checked against each other."""

    def __init__(self, cfg: DataConfig):
        self.sources: list[Source] = cfg.mixture()
        self.metas = [data.read_meta(s.dir, s.format) for s in self.sources]
        first = self.metas[0]["tokenizer"]
        for source, meta in zip(self.sources[1:], self.metas[1:]):
            theirs = meta["tokenizer"]
            if (theirs.get("name"), theirs.get("n_vocab"), theirs.get("sha256")) != (
                    first.get("name"), first.get("n_vocab"), first.get("sha256")):
                raise DataError(f"data.sources: '{source.dir}' was tokenized with {theirs.get('name')!r} "
                                f"({theirs.get('n_vocab')} tokens), '{self.sources[0].dir}' with "
                                f"{first.get('name')!r} ({first.get('n_vocab')} tokens): a mixture needs one "
                                "tokenizer; prepare them with the same one")
        self.counts = apportion([s.weight for s in self.sources])
        self._splits: dict[tuple[str, int], list[data.Split]] = {}
        for source, count in zip(self.sources, self.counts):
            if count == 0:
                raise ConfigError(f"config key 'data.sources': the weight of '{source.dir}' is below 1/{BLOCK} of "
                                  "the total, so none of its samples would be drawn: raise it or leave it out")

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1

    @property
    def tokenizer(self) -> dict:
        return self.metas[0]["tokenizer"]

    @property
    def tokenizer_dir(self) -> str:
        """Where a tokenizer trained on the corpus lies (every source's is the same, by its hash)."""
        return self.sources[0].dir

    @property
    def shares(self) -> list[float]:
        """Each source's exact fraction of the samples."""
        return [c / BLOCK for c in self.counts]

    def fingerprint(self) -> str:
        """The identity of the token stream: one folder's is data.fingerprint's, unchanged; a mixture's covers
        every folder and the shares."""
        if not self.mixed:
            return data.fingerprint(self.metas[0])
        identity = [[data.fingerprint(m), c] for m, c in zip(self.metas, self.counts)]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def splits(self, name: str, seq_len: int, cache: remote.Cache) -> list[data.Split]:
        """Each source's split, opened once (train.epochs reads the train split's size before the trainer)."""
        if (name, seq_len) not in self._splits:
            self._splits[name, seq_len] = [data.Split(s.dir, name, seq_len, s.format, cache) for s in self.sources]
        return self._splits[name, seq_len]

    def stream(self, splits: list[data.Split], seed: int) -> data.Shuffled | Mixture:
        """The training sample stream. One source is read exactly as data.dir is: same samples, same order."""
        if not self.mixed:
            return data.Shuffled(splits[0], seed)
        return Mixture([data.Shuffled(split, seed, (i,)) for i, split in enumerate(splits)], self.counts, seed)

    def bits_per_byte(self, losses: list[float], split: str = "val") -> list[float | None]:
        return [data.bits_per_byte(loss, meta, split) for loss, meta in zip(losses, self.metas)]

    def overall(self, values: list[float | None]) -> float | None:
        """The mixture's figure: the sources' weighted by their shares (one source's: its own)."""
        if not self.mixed:
            return values[0]
        if any(v is None for v in values):
            return None
        return sum(share * v for share, v in zip(self.shares, values))

    def describe(self) -> str:
        if not self.mixed:
            return f"'{self.sources[0].dir}'"
        return "a mixture of " + ", ".join(f"'{s.dir}' ({share:.1%})" for s, share in zip(self.sources, self.shares))
