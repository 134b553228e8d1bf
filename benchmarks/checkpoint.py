"""How long a checkpoint blocks training, against a plain synchronous torch.save of the same state.

GPT-2 small (124M parameters) with its AdamW state on CPU (about 1.5 GB), saved to local disk and
to moto's S3 server on loopback (started here when `moto_server` is installed). Prints a table.
"Blocked" is what `CheckpointManager.save` returns, the figure the trainer prints, over the trainer's
own parts: gathering the RNG states and the full state, and the copy into the staging buffers.

    python benchmarks/checkpoint.py [--layers 12] [--storage local,s3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import fsspec
import torch

import gpt_train
from gpt_train import tokenizer
from gpt_train.checkpoint import CheckpointManager
from gpt_train.config import Config, load_config, to_dict
from gpt_train.distributed import World
from gpt_train.model import GPT
from gpt_train.optim import OptimizerState, build_optimizer
from gpt_train.parallel import ModelState
from gpt_train.rng import RankRNG
from gpt_train.train import TrainState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return proc, f"s3://{bucket}"


def trained_parts(layers: int) -> tuple[Config, GPT, dict]:
    """The parts the trainer attaches to its CheckpointManager (all but the loader, which only adds its
    position to meta.json), for one process on CPU."""
    cfg = load_config("gpt2", ["vocab_size=50257", f"n_layer={layers}", "checkpoint.keep_last=2",
                               "checkpoint.keep_best=false"])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's moments exist only after a step
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # CPU trains in fp32 or bf16: no loss scaler
    parts = {"model": ModelState(model), "train": TrainState(), "rng": RankRNG(cfg.train.seed, 0, torch.device("cpu")),
             "optimizer": OptimizerState(model, opt, scaler)}
    return cfg, model, parts


def manager(cfg: Config, run_dir: str, parts: dict) -> CheckpointManager:
    about = {"config": to_dict(cfg), "tokenizer": tokenizer.gpt2().identity(), "version": gpt_train.__version__}
    ckpt = CheckpointManager(cfg.checkpoint, run_dir, World(), about, log=lambda m: None)
    ckpt.attach(**parts)
    return ckpt


def measure(root: str, cfg: Config, parts: dict) -> dict:
    # The baseline gathers the same states and writes them in one file before training goes on.
    t0 = time.perf_counter()
    state = {name: part.state_dict() for name, part in parts.items()}
    with fsspec.open(f"{root}/sync/state.pt", "wb") as f:
        torch.save(state, f)
    sync = time.perf_counter() - t0

    ckpt = manager(cfg, f"{root}/run", parts)
    # The first save allocates the staging buffers; the second is what every later save costs.
    for step in (1, 2):
        parts["train"].step = step
        t0 = time.perf_counter()
        blocked = ckpt.save(val_loss=None)
        if step == 1:
            first = blocked
        assert ckpt.wait(), ckpt.writer.last_error
        total = time.perf_counter() - t0

    # What a restart does: pick the newest checkpoint, read and verify every file, load every part.
    again = manager(cfg, f"{root}/run", parts)
    t0 = time.perf_counter()
    found, _, _ = again.resume_point()
    again.load_weights(found)
    again.restore(found)
    resume = time.perf_counter() - t0
    assert found.step == 2 and parts["train"].step == 2, found.url
    size = sum(v.numel() * v.element_size() for v in found.model.values())
    size += sum(v.numel() * v.element_size() for s in found.optimizer["optimizer"]["state"].values()
                for v in s.values() if torch.is_tensor(v))
    return {"sync": sync, "first": first, "blocked": blocked, "total": total, "resume": resume, "gb": size / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--storage", default="local,s3")
    args = parser.parse_args()

    cfg, model, parts = trained_parts(args.layers)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {model.num_params(non_embedding=False) / 1e6:.1f}M parameters + AdamW state\n")
    print("| storage | state GB | sync torch.save s | first save blocked s | later saves blocked s | blocked / sync "
          "| background write s | resume (load + verify) s |")
    print("|---|---|---|---|---|---|---|---|")
    for storage in args.storage.split(","):
        moto = None
        if storage == "local":
            tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
            root = tmp
        else:
            moto, root = start_moto()
        try:
            r = measure(root, cfg, parts)
            print(f"| {storage} | {r['gb']:.2f} | {r['sync']:.2f} | {r['first']:.2f} | {r['blocked']:.2f} "
                  f"| {r['blocked'] / r['sync']:.0%} "
                  f"| {r['total']:.2f} | {r['resume']:.2f} |", flush=True)
        finally:
            if moto:
                moto.terminate()
                moto.wait()
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
