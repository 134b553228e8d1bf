"""How fast the loader alone hands out batches (data.Loader.next_batch in a loop, no model), from local shards and
from moto's S3 server on loopback with a cold and a warm cache, against what training consumes on this machine.

Two shapes: the `default` preset's (sequences of 128, 16 per step) and GPT-2 small's (`gpt2`: sequences of 1024,
480 per step). The data is random uint16 ids in gpt-train shards (`--tokens`, 64M by default: 128 MB in 4
shards), written here with a meta.json and uploaded to a bucket of a moto_server started here. Cold = the first
`--cold-samples` samples from an empty cache (a new folder); warm = `--warm-samples` samples of a new Split and
Loader on the cache the cold pass filled, as a restarted job on the same machine finds it. Local shards are read
from the page cache (just written). Consumption = samples per second of one training step of that preset's model
on this machine (benchmarks/train_throughput.py's step: bf16 autocast, one micro-batch, best of `--steps`).

    python benchmarks/data_loader.py [--tokens 64000000] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch
from checkpoint import start_moto  # moto_server on loopback, AWS_* set for it
from train_throughput import GPT2_VOCAB, Peaks, cpu_name, measure

from gpt_train import data, formats, precision, remote
from gpt_train import tokenizer as tokenizers
from gpt_train.config import load_config


def write_data(root: Path, tokens: int, shards: int) -> None:
    rng = np.random.default_rng(0)
    names = []
    for i in range(shards):
        names.append(f"train-{i:05d}.bin")
        rng.integers(0, GPT2_VOCAB, tokens // shards, dtype=np.uint16).tofile(root / names[-1])
    rng.integers(0, GPT2_VOCAB, 1 << 16, dtype=np.uint16).tofile(root / "val-00000.bin")
    meta = {"format": formats.META_FORMAT, "shard_format": formats.NATIVE, "header_bytes": 0,
            "tokenizer": tokenizers.gpt2().identity(), "dtype": "uint16",
            "splits": {"train": {"shards": names, "tokens": tokens // shards * shards, "max_id": GPT2_VOCAB - 1},
                       "val": {"shards": ["val-00000.bin"], "tokens": 1 << 16, "max_id": GPT2_VOCAB - 1}}}
    (root / "meta.json").write_text(json.dumps(meta))


def loader_rate(data_dir: str, seq_len: int, global_batch: int, micro: int, samples: int,
                cache: remote.Cache | None) -> float:
    """Samples per second of next_batch over `samples` samples (whole steps), from a fresh Split and Loader."""
    split = data.Split(data_dir, "train", seq_len, cache=cache)
    loader = data.Loader(data.Shuffled(split, 0), global_batch, micro, 0, 1, prefetch=True)
    steps = math.ceil(samples / global_batch)
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    return steps * global_batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64_000_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--cold-samples", type=int, default=2048)
    p.add_argument("--warm-samples", type=int, default=16384)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per preset (one warm-up before)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    local = work / "data"
    local.mkdir()
    write_data(local, args.tokens, args.shards)
    moto, bucket = start_moto()
    try:
        url = f"{bucket}/data"
        fs = fsspec.filesystem("s3")
        for path in local.iterdir():
            fs.put_file(str(path), f"{url}/{path.name}")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; Python {sys.version.split()[0]}")
        print(f"data: {args.tokens / 1e6:.0f}M random uint16 ids in {args.shards} shards "
              f"({args.tokens * 2 / 1e6:.0f} MB); blocks of {remote.BLOCK_BYTES >> 20} MiB, "
              f"{remote.FETCH_THREADS} fetch threads\n")
        print("| shape | consumed by training, samples/s | source | cache | loader samples/s | loader tokens/s "
              "| loader / consumption |")
        print("|---|---:|---|---|---:|---:|---:|")
        for preset in ("default", "gpt2"):
            cfg = load_config(preset, ["train.device=cpu"])
            m, t = cfg.model, cfg.train
            seq, micro, global_batch = m.block_size, t.micro_batch, t.batch_tokens // m.block_size
            step = measure(argparse.Namespace(layers=m.n_layer, width=m.n_embd, heads=m.n_head, seq_len=seq,
                                              micro_batch=micro, vocab=GPT2_VOCAB, warmup=1, steps=args.steps),
                           precision.choose("auto", torch.device("cpu")), False, Peaks())
            consumed = micro / min(step["times"])
            shape = f"`{preset}`: T={seq}, {global_batch} seq/step, micro {micro}"
            cache_dir = work / f"cache-{preset}"
            rows = [("local", "-", loader_rate(str(local), seq, global_batch, micro, args.warm_samples, None)),
                    ("moto S3", "cold", loader_rate(url, seq, global_batch, micro, args.cold_samples,
                                                    remote.Cache(str(cache_dir), 10**10))),
                    ("moto S3", "warm", loader_rate(url, seq, global_batch, micro, args.warm_samples,
                                                    remote.Cache(str(cache_dir), 10**10)))]
            for source, cache, rate in rows:
                print(f"| {shape} | {consumed:,.1f} | {source} | {cache} | {rate:,.0f} | {rate * seq:,.0f} "
                      f"| {rate / consumed:,.0f}x |", flush=True)
    finally:
        moto.terminate()
        moto.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
