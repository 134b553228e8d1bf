"""benchmarks/gpu_check.py, which no GPU has run yet: without a GPU it says so in one line and runs nothing;
`--device cpu` runs every row end to end (tiny model, gloo), so that its logic is tested before a GPU hour."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ROWS = ["versions", "bf16 matmul peak", "GPT-2 bf16 eager", "GPT-2 bf16 compile", "GPT-2 fp16 + GradScaler",
        "kill -9 + resume", "DDP, 2 rank(s)", "FSDP2, 2 rank(s)", "checkpoint stall, GPT-2 1L + AdamW"]


def gpu_check(*args: str, env: dict | None = None, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_without_a_gpu_one_line_and_exit_0():
    done = gpu_check(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)  # hides the GPUs of a machine that has some
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stdout + done.stderr
    assert "no GPU" in lines[0] and "nothing run" in lines[0]


@pytest.mark.slow
def test_cpu_mode_runs_every_row_and_none_fails(tmp_path):
    out = tmp_path / "table.md"
    done = gpu_check("--device", "cpu", "--quick", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    body = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]  # after the column names
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in body]
    assert [r[0] for r in rows] == ROWS, done.stdout
    verdicts = {r[0]: r[3] for r in rows}
    assert verdicts.pop("GPT-2 fp16 + GradScaler") == "skip"  # fp16 needs CUDA: skipped, saying why
    assert set(verdicts.values()) == {"pass"}, done.stdout
    by_name = {r[0]: r[1] for r in rows}
    assert "needs a CUDA device" in by_name["GPT-2 fp16 + GradScaler"]
    assert "SIGKILL at step" in by_name["kill -9 + resume"] and "equal the uninterrupted run's" in by_name["kill -9 + resume"]
    assert "backend gloo" in by_name["DDP, 2 rank(s)"] and "from DDP's losses" in by_name["FSDP2, 2 rank(s)"]
    assert out.read_text() == done.stdout  # --out writes the same markdown
