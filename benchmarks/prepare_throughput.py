"""How fast `gpt-train prepare` tokenizes, with one worker and with every core, as a markdown table.

The corpus is the bundled Moby Dick repeated to ~100 MB in one file: a single long document, so the numbers
include cutting it into pieces, and with several workers, starting their processes (~0.5 s). Each setting
runs `--repeats` times and reports the fastest run. "MB per CPU second" counts the CPU time of this process
and its worker processes: it depends much less than wall time on what else the machine runs. The last two
rows encode the same text in 1 MB pieces on one thread with no I/O: tiktoken with GPT-2's pattern as OpenAI
ships it, and our `Tokenizer.encode` (the same ids: cut at runs of spaces, then a pattern without lookahead).
Usage: python benchmarks/prepare_throughput.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import tiktoken

from gpt_train import prepare as P
from gpt_train import tokenizer as T


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def make_corpus(directory: Path, megabytes: float) -> Path:
    book = Path(P.bundled_corpus()).read_bytes()
    path = directory / "corpus.txt"
    path.write_bytes(book * max(1, round(megabytes * 1e6 / len(book))))
    return path


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children (prepare's worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))


def fastest_run(corpus: Path, out: Path, workers: int, repeats: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens written) of the fastest of `repeats` forced prepares."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        with contextlib.redirect_stdout(io.StringIO()):
            meta = P.prepare([str(corpus)], str(out), workers=workers, force=True)
        runs.append((time.perf_counter() - wall, cpu_seconds() - cpu))
    wall, cpu = min(runs)
    return wall, cpu, sum(split["tokens"] for split in meta["splits"].values())


def encode_alone(corpus: Path, encode) -> tuple[float, float, int]:
    text = corpus.read_text(encoding="utf-8")
    pieces = [text[i:i + P.ITEM_CHARS] for i in range(0, len(text), P.ITEM_CHARS)]
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(len(encode(piece)) for piece in pieces)
    return time.perf_counter() - wall, cpu_seconds() - cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = P._cores()
    T.gpt2()  # built once per process; not part of what is measured
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp), args.megabytes)
        size = corpus.stat().st_size
        print(f"Machine: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online), load average "
              f"{os.getloadavg()[0]:.1f} at start; Python {platform.python_version()}, tiktoken {tiktoken.__version__}")
        print(f"Corpus: bundled moby_dick.txt x{size // Path(P.bundled_corpus()).stat().st_size} = {size / 1e6:.1f} MB "
              f"(one document), GPT-2 tokenizer, best of {args.repeats}\n")
        print("| workers | seconds | MB/s | tokens/s | MB per CPU second |")
        print("|---:|---:|---:|---:|---:|")
        runs = {str(w): fastest_run(corpus, Path(tmp) / "out", w, args.repeats) for w in sorted({1, cores})}
        tok = T.gpt2()
        plain = tiktoken.Encoding("gpt2", pat_str=T.GPT2_PATTERN, mergeable_ranks=tok.ranks, special_tokens={})
        runs["tiktoken alone, 1 thread"] = min(encode_alone(corpus, plain.encode_ordinary)
                                               for _ in range(args.repeats))
        runs["our encode alone, 1 thread"] = min(encode_alone(corpus, tok.encode_array) for _ in range(args.repeats))
        for workers, (wall, cpu, tokens) in runs.items():
            mb = size / 1e6
            print(f"| {workers} | {wall:.2f} | {mb / wall:.1f} | {tokens / wall / 1e6:.2f} M | {mb / cpu:.1f} |")


if __name__ == "__main__":
    main()
