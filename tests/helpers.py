"""Shared pieces of the tests: a small prepared corpus and ways to run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_train.prepare import bundled_corpus, prepare

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a step takes milliseconds on one core, still with the GPT-2 vocabulary.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.batch_tokens=256", "train.micro_batch=4", "train.log_interval=1", "train.eval_interval=5",
    "train.eval_batches=2", "train.sample_tokens=8", "schedule.warmup_steps=2", "optim.lr=3e-3",
    "schedule.min_lr=3e-4", "checkpoint.interval=2", "checkpoint.keep_last=10",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The first 200 kB of the bundled corpus, prepared with the GPT-2 tokenizer."""
    root = tmp_path_factory.mktemp("data")
    text = Path(bundled_corpus()).read_text()[:200_000]
    (root / "corpus.txt").write_text(text)
    out = str(root / "prepared")
    prepare([str(root / "corpus.txt")], out, val_fraction=0.1)
    return out


def cli(*args: str, env: dict | None = None, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m gpt_train ARGS` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpt_train", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A failed command whose whole complaint is one line on stderr, holding every fragment: no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(data: str, run_dir: str, *extra: str) -> list[str]:
    return ["train", "default", f"data.dir={data}", f"run_dir={run_dir}", *TINY, *extra]


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
