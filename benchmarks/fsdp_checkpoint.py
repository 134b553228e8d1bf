"""FSDP checkpoints two ways: the full state gathered into rank 0 and written there (what the trainer does),
against `torch.distributed.checkpoint` (DCP) writing every rank's shard in parallel; and each loaded into
one process, as a resume on another world size would.

    python benchmarks/fsdp_checkpoint.py [--layers 12] [--ranks 2]     # starts torchrun itself
    python -m torch.distributed.run --nproc-per-node=2 --standalone benchmarks/fsdp_checkpoint.py

GPT-2 small (124M) with its AdamW state on CPU, sharded with `parallel.wrap`'s FSDP2 over gloo ranks of
one thread each, written to local disk. The ways:

- full state to rank 0: `CheckpointManager.save` over the trainer's own parts (`parallel.model_state` and
  `optimizer_state` gather every shard into rank 0's host memory, then `Checkpointer` copies and streams
  the files in the background), then `wait()`.
- DCP save: `dcp.save` of the sharded state dicts (`get_model_state_dict` / `get_optimizer_state_dict`
  without full_state_dict): each rank writes its own shard, rank 0 the metadata. Synchronous.
- DCP async_save: the same staged into a host copy first, then written on a thread, over a gloo group of
  its own (the default group stays with training's collectives).

After each DCP save every rank hashes the files it wrote and rank 0 writes a MANIFEST.json listing all of
them: what keeping our commit marker would cost. "Blocked" is rank 0's time until training could go on;
"total" until the checkpoint is complete (manifest included); the better of a way's later saves counts
(three saves of the trainer's way, the first allocating its staging buffers; two of each DCP way). Peak
memory is rank 0's resident memory, sampled every 5 ms across a way's saves, above what it was before the
first; "kept" is what stays resident after the last. The loads run in a fresh process each: the full
checkpoint with `checkpoint.load` (verifies the manifest) into the parts, the DCP one with `dcp.load
(no_dist=True)` into a one-process model and optimizer (resharding 2 shards into whole tensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from checkpoint import PeakMemory  # benchmarks/checkpoint.py
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gpt_train import distributed, parallel, rundir, tokenizer
from gpt_train.checkpoint import CheckpointManager, load
from gpt_train.config import load_config, to_dict
from gpt_train.model import GPT, TIED_WEIGHT
from gpt_train.optim import OptimizerState, build_optimizer
from gpt_train.parallel import ModelState
from gpt_train.rng import RankRNG
from gpt_train.train import TrainState


def config(layers: int):
    return load_config("gpt2", ["vocab_size=50257", f"n_layer={layers}", "checkpoint.keep_last=2",
                                "checkpoint.keep_best=false", "distributed.strategy=fsdp", "train.precision=fp32"])


def stepped(cfg, world: distributed.World | None = None, seed: int = 0):
    """(model, optimizer) after one AdamW step on random gradients, sharded with FSDP when `world` is given."""
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    if world is not None:
        parallel.wrap(model, world, torch.device("cpu"), cfg)
    opt = build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def sharded_state(model, opt) -> dict:
    """Each rank's shards (whole tensors on one process), without the output matrix: it is the embedding's,
    which `parallel.model_state` leaves out of model.pt too."""
    weights = {k: v for k, v in get_model_state_dict(model).items() if k != TIED_WEIGHT}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, opt)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, rank: int) -> None:
    """Every rank hashes the files it wrote (DCP names them __RANK_N.distcp; rank 0 also writes .metadata);
    rank 0 lists them all in MANIFEST.json, written last, as Checkpointer does."""
    mine = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())
            if p.name.startswith(f"__{rank}_") or (rank == 0 and p.name == ".metadata")}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        files = {k: v for part in every for k, v in part.items()}
        manifest = {"format": "dcp+" + rundir.FORMAT, "files": files}  # a sketch: gpt-train does not load these
        (folder / rundir.MANIFEST).write_text(json.dumps(manifest, indent=2))


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: every way's save; rank 0 then loads each into a fresh process and prints the table."""
    world = distributed.detect_world()
    torch.set_num_threads(1)
    cfg = config(args.layers)
    distributed.init(world, torch.device("cpu"), cfg.distributed)
    model, opt = stepped(cfg, world)
    made = [tempfile.mkdtemp(prefix="fsdp-ckpt-bench-") if world.is_main else None]
    dist.broadcast_object_list(made)
    root, rows = Path(made[0]), {}

    # (a) the trainer's way. The first save allocates the staging buffers, the later ones reuse them: the
    # better of those two counts (other processes on the machine only ever slow a save down).
    parts = {"model": ModelState(model), "train": TrainState(), "rng": RankRNG(cfg.train.seed, world.rank, torch.device("cpu")),
             "optimizer": OptimizerState(model, opt, torch.amp.GradScaler("cpu", enabled=False))}
    about = {"config": to_dict(cfg), "tokenizer": tokenizer.gpt2().identity(), "version": "bench"}
    ckpt = CheckpointManager(cfg.checkpoint, str(root / "full"), world, about, log=lambda m: None)
    ckpt.attach(**parts)
    dist.barrier()
    blocked, total = [], []
    with PeakMemory() as memory:
        for step in (1, 2, 3):
            parts["train"].step = step
            t0 = time.perf_counter()
            blocked.append(ckpt.save(val_loss=None))
            assert ckpt.wait() if world.is_main else True, ckpt.writer.last_error
            total.append(time.perf_counter() - t0)
    if world.is_main:  # the other ranks' save returns None: they only take part in the gathering
        rows["full state to rank 0"] = {"blocked": min(blocked[1:]), "total": min(total[1:]), "peak": memory.peak,
                                        "kept": memory.end, "folder": f"full/checkpoints/{rundir.step_name(3)}"}
    del ckpt, parts

    # (b) DCP, synchronous and asynchronous: nothing is kept between saves; the better of two saves counts
    async_group = dist.new_group(backend="gloo")
    for name, asynchronous in (("DCP save", False), ("DCP async_save", True)):
        times = []
        dist.barrier()
        with PeakMemory() as memory:
            for attempt in (1, 2):
                folder = root / f"{name.replace(' ', '-')}-{attempt}"
                t0 = time.perf_counter()
                state = sharded_state(model, opt)
                if asynchronous:
                    pending = dcp.async_save(state, checkpoint_id=str(folder), process_group=async_group)
                    blocked = time.perf_counter() - t0
                    pending.result()
                else:
                    dcp.save(state, checkpoint_id=str(folder))
                    blocked = time.perf_counter() - t0
                del state
                t1 = time.perf_counter()
                write_manifest(folder, world.rank)
                times.append((blocked, time.perf_counter() - t0, time.perf_counter() - t1))
        rows[name] = {"blocked": min(t[0] for t in times), "total": min(t[1] for t in times),
                      "manifest": min(t[2] for t in times), "peak": memory.peak, "kept": memory.end,
                      "folder": folder.name}
    dist.barrier()
    dist.destroy_process_group()
    if world.is_main:
        try:
            report(args, root, rows)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def load_alone(args: argparse.Namespace) -> None:
    """One process, no process group: what a resume on another world size does first. Prints a JSON line."""
    torch.set_num_threads(1)
    kind, path = args.load.split(":", 1)
    model, opt = stepped(config(args.layers), seed=1)  # other values than the ones saved, all to be replaced
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        if kind == "full":
            found = load(path)
            ModelState(model).load_state_dict(found.model)
            OptimizerState(model, opt, torch.amp.GradScaler("cpu", enabled=False)).load_state_dict(found.optimizer)
        else:
            state = sharded_state(model, opt)  # whole tensors here: DCP reads every rank's shard into them
            dcp.load(state, checkpoint_id=path, no_dist=True)
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # the tied matrix comes with wte
            set_optimizer_state_dict(model, opt, state["optimizer"])
        seconds = time.perf_counter() - t0
    # The same state from either checkpoint, if DCP put the shards back together right
    tensors = [*model.state_dict().values(), *(v for st in opt.state.values() for v in st.values())]
    fingerprint = [float(t.double().sum()) for t in tensors]
    print(json.dumps({"load": seconds, "load_peak": memory.peak, "fingerprint": fingerprint}))


def report(args: argparse.Namespace, root: Path, rows: dict) -> None:
    here = str(Path(__file__).resolve())
    for name, kind in (("full state to rank 0", "full"), ("DCP save", "dcp")):
        out = subprocess.run([sys.executable, here, f"--layers={args.layers}", f"--load={kind}:{root / rows[name]['folder']}"],
                             check=True, capture_output=True, text=True)
        rows[name].update(json.loads(out.stdout.splitlines()[-1]))
    assert rows["full state to rank 0"]["fingerprint"] == rows["DCP save"]["fingerprint"], "DCP loaded another state"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {os.environ['WORLD_SIZE']} "
          f"gloo ranks of 1 thread; GPT-2 with {args.layers} layers + AdamW\n")
    print("| way | rank 0 blocked s | total s (of which manifest) | rank 0 peak host memory GB | kept between saves GB "
          "| files written | load into 1 process s | load peak host memory GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        files = [p for p in (root / r["folder"]).iterdir() if p.is_file()]
        written = f"{len(files)}, {sum(p.stat().st_size for p in files) / 1e9:.2f} GB"
        manifest = f" ({r['manifest']:.2f})" if "manifest" in r else ""
        load_s = f"{r['load']:.2f}" if "load" in r else "as DCP save"
        load_peak = f"{r['load_peak'] / 1e9:.2f}" if "load_peak" in r else "as DCP save"
        print(f"| {name} | {r['blocked']:.2f} | {r['total']:.2f}{manifest} | {r['peak'] / 1e9:.2f} | {r['kept'] / 1e9:.2f} "
              f"| {written} | {load_s} | {load_peak} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ranks", type=int, default=2, help="ranks torchrun starts (when not started by torchrun)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # full:FOLDER or dcp:FOLDER, in a process of its own
    args = parser.parse_args()
    if args.load:
        load_alone(args)
    elif "RANK" in os.environ:
        worker(args)
    else:  # `make bench` runs it with plain python
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}", "--standalone",
                        __file__, f"--layers={args.layers}"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
