"""How long a checkpoint blocks training, against a plain synchronous torch.save of the same state, and
how much host memory it takes.

GPT-2 small (124M parameters) with its AdamW state on CPU (about 1.5 GB), saved to local disk and
to moto's S3 server on loopback (started here when `moto_server` is installed). Prints a table.
"Blocked" is what `CheckpointManager.save` returns, the figure the trainer prints, over the trainer's
own parts: gathering the RNG states and the full state, and the copy into the staging buffers.

Each storage is written three ways: files serialized whole into memory and then written (how checkpoints
were written before they were streamed, kept here as the comparison), and streamed into the store with
the default host budget (8 GB: the whole copy is kept between saves) and with none, each in a process of
its own (started here) so that none reuses memory another freed. Peak memory is that process's resident
memory, sampled every 5 ms over three saves and their writes, less what it was before the first; "kept"
is what is still resident after the last save is written.

    python benchmarks/checkpoint.py [--layers 12] [--storage local,s3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import fsspec
import torch

import gpt_train
from gpt_train import rundir, tokenizer
from gpt_train.checkpoint import Checkpointer, CheckpointManager
from gpt_train.config import Config, load_config, to_dict
from gpt_train.distributed import World
from gpt_train.model import GPT
from gpt_train.optim import OptimizerState, build_optimizer
from gpt_train.parallel import ModelState
from gpt_train.rng import RankRNG
from gpt_train.train import TrainState


class PeakMemory:
    """This process's resident memory, sampled on a thread while the block runs: `peak` and `end` over `base`,
    the resident memory when it started, in bytes. (ru_maxrss is the high-water mark since the process
    started: it cannot show a peak below an earlier one.)"""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s

    @classmethod
    def resident(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def __enter__(self) -> PeakMemory:
        self.base = self.highest = self.resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.highest = max(self.highest, self.resident())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        last = self.resident()
        self.peak, self.end = max(self.highest, last) - self.base, last - self.base


class BufferedCheckpointer(Checkpointer):
    """The comparison: each file serialized whole into memory, all of them held until the manifest is
    written, as Checkpointer wrote them before it streamed them."""

    def _write(self, step, copies, rng, meta) -> None:
        folder = rundir.step_folder(step)
        self.store.remove(f"{folder}/{rundir.MANIFEST}")
        files = {}
        for name, obj in (*copies.items(), ("rng.pt", rng)):
            buf = io.BytesIO()
            torch.save(obj, buf)
            files[name] = buf.getvalue()
        files[rundir.META] = json.dumps(meta, indent=2, sort_keys=True).encode()
        for name, data in files.items():
            self.store.write_bytes(f"{folder}/{name}", data)
        manifest = {"format": rundir.FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
        self.store.write_text(f"{folder}/{rundir.MANIFEST}", json.dumps(manifest, indent=2))
        self.store.write_text(rundir.LATEST, rundir.step_name(step) + "\n")


# (name, writer, host budget in bytes)
WAYS = [("buffered (before)", BufferedCheckpointer, 1 << 62),
        ("streamed, budget 8 GB", Checkpointer, 8 * 10**9),
        ("streamed, budget 0", Checkpointer, 0)]


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


def state_bytes(parts: dict) -> int:
    """The tensors a checkpoint holds: the weights and the optimizer's state."""
    opt = parts["optimizer"].state_dict()["optimizer"]["state"]
    tensors = [*parts["model"].state_dict().values(), *(v for s in opt.values() for v in s.values())]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def sync_save(root: str, parts: dict) -> float:
    """The baseline: the same states gathered and written in one file before training goes on."""
    t0 = time.perf_counter()
    state = {name: part.state_dict() for name, part in parts.items()}
    with fsspec.open(f"{root}/sync/state.pt", "wb") as f:
        torch.save(state, f)
    return time.perf_counter() - t0


def measure(root: str, cfg: Config, parts: dict, writer: type[Checkpointer], budget: int, resume: bool) -> dict:
    """Three saves: the first allocates the staging buffers that the budget keeps, the later ones reuse them
    (the better of the two counts: other processes on the machine only ever slow a save down); then, with
    `resume`, a restart."""
    ckpt = manager(cfg, root, parts)
    c = cfg.checkpoint
    ckpt.writer = writer(root, c.keep_last, c.keep_best, asynchronous=c.async_save, log=lambda m: None,
                         host_budget_bytes=budget)
    blocked = []
    with PeakMemory() as memory:
        for step in (1, 2, 3):
            parts["train"].step = step
            t0 = time.perf_counter()
            blocked.append(ckpt.save(val_loss=None))
            assert ckpt.wait(), ckpt.writer.last_error
            total = time.perf_counter() - t0
    out = {"first": blocked[0], "blocked": min(blocked[1:]), "total": total, "peak": memory.peak / 1e9,
           "kept": memory.end / 1e9}
    if not resume:
        return out

    # What a restart does: pick the newest checkpoint, read and verify every file, load every part.
    again = manager(cfg, root, parts)
    t0 = time.perf_counter()
    found, _, _ = again.resume_point()
    again.load_weights(found)
    again.restore(found)
    out["resume"] = time.perf_counter() - t0
    assert found.step == 3 and parts["train"].step == 3, found.url
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--storage", default="local,s3")
    parser.add_argument("--way", type=int, help=argparse.SUPPRESS)  # measure WAYS[way] only, under --root
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cfg, model, parts = trained_parts(args.layers)
    if args.way is not None:
        _, writer, budget = WAYS[args.way]
        # A resume reads the same files whichever way they were written: timed once per storage.
        print(json.dumps(measure(args.root, cfg, parts, writer, budget, resume=args.way == 1)))
        return
    gb = state_bytes(parts) / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {model.num_params(non_embedding=False) / 1e6:.1f}M parameters + AdamW state\n")
    print("| storage | write | state GB | sync torch.save s | first save blocked s | later saves blocked s "
          "| blocked / sync | background write s | peak host memory GB | kept between saves GB "
          "| resume (load + verify) s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for storage in args.storage.split(","):
        moto = None
        if storage == "local":
            tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
            root = tmp
        else:
            moto, root = start_moto()
        try:
            sync = sync_save(root, parts)
            for i, (name, _, _) in enumerate(WAYS):
                # Each way in a process of its own, so that none finds memory freed by another to reuse
                one = subprocess.run([sys.executable, __file__, f"--layers={args.layers}", f"--way={i}",
                                      f"--root={root}/{i}"], capture_output=True, text=True)
                if one.returncode:
                    sys.exit(f"{name} failed:\n{one.stderr[-3000:]}")
                r = json.loads(one.stdout.splitlines()[-1])
                resume = f"{r['resume']:.2f}" if "resume" in r else "-"
                print(f"| {storage} | {name} | {gb:.2f} | {sync:.2f} | {r['first']:.2f} | {r['blocked']:.2f} "
                      f"| {r['blocked'] / sync:.0%} | {r['total']:.2f} | {r['peak']:.2f} | {r['kept']:.2f} "
                      f"| {resume} |", flush=True)
        finally:
            if moto:
                moto.terminate()
                moto.wait()
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
