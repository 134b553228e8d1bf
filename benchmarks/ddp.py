"""DDP on this CPU: tokens/s and step time for 1 and 2 processes (torchrun, gloo) at the same global batch,
and the share of the step spent in communication.

    python benchmarks/ddp.py                          # 1 process x all cores, 2 processes x half the cores each
    python benchmarks/ddp.py --rows 1x2 1x1 2x1       # PROCESSESxTHREADS per row

Each row is a real `torchrun --standalone --nproc-per-node=N` of this file. A step is train.py's: autocast
forward, backward through `parallel.wrap`'s DDP (gradients all-reduced in buckets during backward),
clip_grad_norm_, AdamW, zero_grad. The global batch (sequences per optimizer step) is the same for every
row, split across the ranks, and the ranks share the machine's cores (by default torch threads = cores /
processes), so the rows compare one process with N on the same hardware.

Communication share = (step with gradient sync - the same step inside `no_sync()`) / step with sync: the
all-reduce time that backward could not hide. Synced and unsynced steps alternate, so both see the same
load. The all-reduce of one full gradient (every parameter, fp32) is also timed on its own. Tokens are
random: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        return "CPU"


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from gpt_train import collectives, distributed, optim, parallel, precision
    from gpt_train.config import Config
    from gpt_train.model import GPT

    world = distributed.detect_world()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = Config()
    cfg.distributed.timeout_s = 120
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size = args.layers, args.width, args.width // 64, args.seq_len, 50257
    backend = distributed.init(world, device, cfg.distributed)
    precision.make_deterministic(True, device)  # train.py's CPU default
    prec = precision.choose("auto", device)
    torch.manual_seed(0)
    model = GPT(m)
    ddp = parallel.wrap(model, world, device, cfg)
    opt = optim.build_optimizer(model, cfg, "cpu")
    per_rank = args.batch // world.world_size
    gen = torch.Generator().manual_seed(world.rank)
    x = torch.randint(0, 50257, (per_rank, args.seq_len), generator=gen)
    y = torch.randint(0, 50257, (per_rank, args.seq_len), generator=gen)

    def step(sync: bool) -> float:
        start = time.perf_counter()
        context = ddp.no_sync() if (world.distributed and not sync) else contextlib.nullcontext()
        with context:
            with precision.autocast(prec, device):
                _, loss = ddp(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(True)
    synced, unsynced = [], []
    for _ in range(args.steps):
        if world.distributed:
            collectives.barrier()
        synced.append(step(True))
        if world.distributed:
            collectives.barrier()
            unsynced.append(step(False))
    allreduce = []
    if world.distributed:
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        for _ in range(args.steps):
            collectives.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            allreduce.append(time.perf_counter() - start)
    if world.is_main:
        Path(args.out).write_text(json.dumps({
            "procs": world.world_size, "threads": torch.get_num_threads(), "backend": backend, "precision": prec,
            "params": model.num_params(non_embedding=False), "synced": synced, "unsynced": unsynced,
            "allreduce": allreduce, "tokens_per_step": args.batch * args.seq_len,
        }))
    distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    p.add_argument("--rows", nargs="+", default=[f"1x{cores}", f"2x{max(1, cores // 2)}"],
                   help="PROCESSESxTHREADS for each row (default: 1 x all cores, 2 x half each)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step, over all ranks")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    results = []
    for row in args.rows:
        n, threads = (int(v) for v in row.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--out", str(out), "--layers", str(args.layers), "--width", str(args.width),
                   "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(threads)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
            print(f"done: {n} process(es) x {threads} thread(s)", file=sys.stderr, flush=True)

    r0 = results[0]
    print("## DDP on CPU\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, backend gloo, "
          f"precision {r0['precision']} (train.py's auto), deterministic algorithms (train.py's CPU default); "
          f"load average {load:.1f} when it started (other processes on the machine slow every row)")
    print(f"- model: {args.layers} layers x {args.width} wide, GPT-2 vocabulary, {r0['params'] / 1e6:.1f}M parameters "
          f"({r0['params'] * 4 / 1e6:.0f} MB of fp32 gradients all-reduced per step); T={args.seq_len}, "
          f"{args.batch} sequences = {r0['tokens_per_step']:,} tokens per optimizer step over all ranks")
    print(f"- command: python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}")
    print(f"- {args.steps} timed steps of each kind after {args.warmup} warm-up steps; ms/step = median "
          "(best in brackets); speed-up against the first row\n")
    print("| processes | threads each | ms/step | tokens/s | speed-up | step without sync (ms) | communication share "
          "| one gradient all-reduce (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for r in results:
        step = statistics.median(r["synced"])
        tok_s = r["tokens_per_step"] / step
        base = base or tok_s
        nosync = statistics.median(r["unsynced"]) if r["unsynced"] else None
        share = f"{max(0.0, (step - nosync) / step):.0%}" if nosync else "-"
        ar = f"{statistics.median(r['allreduce']) * 1e3:.0f}" if r["allreduce"] else "-"
        nosync_ms = f"{nosync * 1e3:.0f}" if nosync else "-"
        print(f"| {r['procs']} | {r['threads']} | {step * 1e3:.0f} ({min(r['synced']) * 1e3:.0f}) | {tok_s:,.0f} "
              f"| {tok_s / base:.2f}x | {nosync_ms} "
              f"| {share} | {ar} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
