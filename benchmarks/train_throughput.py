"""Training throughput and MFU of one GPT training step on this machine (CPU), in one run.

    python benchmarks/train_throughput.py                 # 6 layers x 384 wide, 256 tokens, micro-batch 8
    python benchmarks/train_throughput.py --compile       # adds torch.compile rows (with freed memory kept)

A step is exactly train.py's: autocast forward with targets, backward, clip_grad_norm_, AdamW step,
zero_grad, with train.py's CPU default of deterministic algorithms. Tokens are random (throughput does
not depend on them). MFU = model FLOPs (GPT.flops_per_token: 6N + attention) / step time / peak, where
the peaks are the FLOP/s of a large fp32 and bf16 torch.mm measured in this same run, because CPUs
have no datasheet peak and this one's depends on the host. Warm-up steps are not timed. On a shared
machine other processes only ever slow a measurement down, so the peaks are the best of samples taken
all through the run (one before each timed step) and MFU uses the best step; the median is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from gpt_train import optim, precision
from gpt_train.config import Config
from gpt_train.model import GPT

GPT2_VOCAB = 50257


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def others_cpu() -> tuple[float, float] | None:
    """(CPU seconds used by other processes, CPU seconds the machine had) so far, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz, own = os.sysconf("SC_CLK_TCK"), os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz - own.user - own.system, sum(ticks) / hz


class Peaks:
    """FLOP/s of a 2048x2048 torch.mm per dtype (precision.measured_peak's), sampled all through the run.

    The best sample counts: a busy neighbour only ever lowers a measurement, for the peak as for a step.
    """

    def __init__(self, n: int = 2048):
        self.n, self.best = n, {}
        self.mats = {name: (torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt))
                     for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    def sample(self, calls: int = 1) -> None:
        for name, (a, b) in self.mats.items():
            for _ in range(calls):
                start = time.perf_counter()
                torch.mm(a, b)
                rate = 2 * self.n**3 / (time.perf_counter() - start)
                self.best[name] = max(self.best.get(name, 0.0), rate)


def build(args: argparse.Namespace) -> tuple[Config, GPT, torch.optim.Optimizer]:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_embd, m.n_head = args.layers, args.width, args.heads or max(1, args.width // 64)
    m.block_size, m.vocab_size, m.dropout = args.seq_len, args.vocab, 0.0
    t.seq_len, t.micro_batch, t.batch_tokens = args.seq_len, args.micro_batch, args.micro_batch * args.seq_len
    torch.manual_seed(0)
    model = GPT(m)
    return cfg, model, optim.build_optimizer(model, cfg, "cpu")


def measure(args: argparse.Namespace, prec: str, compile_: bool, peaks: Peaks) -> dict:
    cfg, model, optimizer = build(args)
    device = torch.device("cpu")
    step_model = torch.compile(model) if compile_ else model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=gen)
    y = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=gen)

    def step() -> None:  # train.py's step with one micro-batch (no accumulation)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(1000, cfg)
        with precision.autocast(prec, device):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        peaks.sample()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    flops = model.flops_per_token(args.seq_len) * args.micro_batch * args.seq_len
    return dict(times=times, flops=flops, warmup_s=warmup_s, params=model.num_params())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=0, help="0: width / 64")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="padded to a multiple of 64 by the model")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (compilation happens here)")
    p.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=["fp32", "bf16", "auto"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (minutes of compilation)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
    p.add_argument("--malloc", choices=["both", "default", "reuse"], default="both",
                   help="glibc malloc as it is, with precision.reuse_freed_memory() (what train.py does on CPU), or both in turn")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision.make_deterministic(True, torch.device("cpu"))  # train.py's default on CPU (deterministic=auto)
    heads = args.heads or max(1, args.width // 64)
    config = f"{args.layers}L {args.width}d {heads}h, T={args.seq_len}, B={args.micro_batch}, V={args.vocab}"
    cpu = torch.device("cpu")

    start_cpu = others_cpu()
    peaks = Peaks()
    peaks.sample(calls=5)
    rows, r = [], {}
    # Freed memory cannot be handed back once kept, so the default allocator's rows come first.
    for reuse in {"both": [False, True], "default": [False], "reuse": [True]}[args.malloc]:
        if reuse and not precision.reuse_freed_memory():
            print("precision.reuse_freed_memory() is a no-op here (not glibc)", file=sys.stderr)
        for compile_ in [False, True] if args.compile and (reuse or args.malloc == "default") else [False]:
            for requested in args.precision:
                prec = precision.choose(requested, cpu)
                r = measure(args, prec, compile_, peaks)
                rows.append((requested, prec, compile_, reuse, r))
                note = f", warm-up incl. compilation {r['warmup_s']:.0f} s" if compile_ else ""
                print(f"done: {requested} ({prec}), compile {compile_}, freed memory {'kept' if reuse else 'returned'}"
                      f"{note}", file=sys.stderr, flush=True)
    peaks.sample(calls=5)
    end_cpu = others_cpu()

    print("## Training throughput (CPU)\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    print(f"- measured torch.mm peak (2048x2048, best sample of the run): fp32 {peaks.best['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks.best['bf16'] / 1e9:.0f} GFLOP/s; auto precision on this CPU = {precision.choose('auto', cpu)}")
    print(f"- model: {r['params'] / 1e6:.1f}M parameters (tied embedding counted once), "
          f"{r['flops'] / 1e9:.0f} GFLOP per step (GPT.flops_per_token)")
    if start_cpu and end_cpu:
        share = (end_cpu[0] - start_cpu[0]) / max(1e-9, end_cpu[1] - start_cpu[1])
        print(f"- other processes used {max(0.0, share):.0%} of the machine's CPU time during the run"
              + (": these numbers are not this machine's, run again when it is idle" if share > 0.1 else ""))
    print(f"- command: python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}")
    print(f"- {args.steps} timed steps after {args.warmup} warm-up steps per row; ms/step: best (median); "
          "tokens/s, GFLOP/s and MFU from the best step")
    print("- freed memory: 'returned' is glibc's default (large tensors get fresh pages every step), 'kept' is "
          "after precision.reuse_freed_memory()\n")
    print("| config | precision | compile | freed memory | ms/step | tokens/s | achieved GFLOP/s "
          "| MFU vs peak of its dtype | MFU vs bf16 peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for requested, prec, compile_, reuse, r in rows:
        best, med = min(r["times"]), statistics.median(r["times"])
        achieved = r["flops"] / best
        label = f"auto ({prec})" if requested == "auto" else prec
        print(f"| {config} | {label} | {'yes' if compile_ else 'no'} | {'kept' if reuse else 'returned'} "
              f"| {best * 1e3:.0f} ({med * 1e3:.0f}) "
              f"| {args.micro_batch * args.seq_len / best:,.0f} | {achieved / 1e9:.0f} "
              f"| {achieved / peaks.best[prec]:.1%} | {achieved / peaks.best['bf16']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
