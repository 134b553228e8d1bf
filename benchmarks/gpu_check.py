"""Is this GPU machine ready to train? One table, in under 8 minutes, on 1 to 8 GPUs.

    python benchmarks/gpu_check.py [--quick] [--out FILE]        (or: make gpu-check)
    python benchmarks/gpu_check.py --device cpu --quick          (the same rows on the CPU, tiny model)

Every row runs the project's own parts in subprocesses, as a user would: `gpt-train env --json` for the
versions, `precision.measured_peak` for the matmul peak, `gpt-train train gpt2 ...` (GPT-2 124M) for the
training rows, torchrun (`python -m torch.distributed.run`) for DDP and FSDP2, and benchmarks/checkpoint.py
for the checkpoint stall, on the bundled corpus prepared into a temporary directory. The rows:

    versions            torch, CUDA, cuDNN, NCCL, the driver, the GPUs (`gpt-train env` finds no problem)
    bf16 matmul peak    the fastest bf16 torch.mm, against the datasheet's dense peak
    bf16 eager          tokens/s and MFU at the largest micro-batch that fits (halving after an out-of-memory)
    bf16 compile        the same compiled, against the targets: llm.c's ~470k tok/s per H100, MFU >= 50%
    fp16 + GradScaler   a few steps: finite losses, the scaler's state in the checkpoint
    kill -9 + resume    SIGKILL after a checkpoint landed, then resume: bit-identical (train.deterministic=true)
    DDP, FSDP2          every visible GPU over NCCL (one rank where only one GPU exists)
    checkpoint stall    what a save blocks training, against a synchronous torch.save of 124M + AdamW

Each row has a time limit and the whole check a budget; a row that fails says why and the next one runs.
Exit status 1 when a row failed. Without a GPU it says so in one line and exits 0. `--device cpu` runs the
same rows with a tiny model, gloo instead of NCCL and the fp16 row skipped, which is how the check itself is
tested on machines without a GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gpt_train import distributed, precision
from gpt_train.checkpoint import load
from gpt_train.errors import UserError
from gpt_train.prepare import bundled_corpus
from gpt_train.rundir import METRICS, step_folder
from gpt_train.runlog import read_jsonl
from gpt_train.storage import Store

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 460  # the whole check, data preparation included: under the 8 minutes with the table printed
MIN_ROW_S = 15  # a row with less time than this left is reported as not run instead of started to be killed
TARGET_TOK_S = 470_000  # llm.c's GPT-2 124M on one H100 (bf16, compiled): tokens/s per GPU
TARGET_MFU = 0.50
# The dense bf16 peak of an H100 SXM (989.4 in precision.GPU_PEAKS) as the trainer prints it, to 3 figures:
# 470k tok/s is judged on GPUs from this peak up.
H100_BF16 = 989e12
HEALTHY_PEAK = 0.60  # a measured matmul peak below this share of the datasheet's: clocks or power capped
STALL_TARGET = 0.25  # docs/performance.md "Checkpoint stalls": a save blocks at most 25% of a synchronous one

STEP = re.compile(r"step +(\d+)/\d+ \| loss (\S+) \| .* \| (\d+) ms/step \| ([\d,]+) tok/s(?: \| mfu ([\d.]+)%)?")
SNAPSHOT = re.compile(r"checkpoint: step (\d+) snapshot taken, training blocked (\d+) ms")
SAVED = re.compile(r"checkpoint: saved \S*step-(\d+)")
RESUMING = re.compile(r"resuming from \S+ \(step (\d+)\)")
WORLD = re.compile(r"world: (\d+) rank\(s\).*, backend (\w+)")
EXCEPTION = re.compile(r"[\w.]+(Error|Exception|Interrupt): ")
DEVICE = re.compile(r"device: \S+, precision (\w+).*?(?:, MFU against ([\d.e+]+) TFLOP/s)?$")


class Failed(Exception):
    """A row's check did not hold: the message is the row's result."""


@dataclass
class Plan:
    """What the rows run on one kind of device."""

    device: str  # train.device
    model: list[str]  # overrides that shrink the model; [] keeps configs/gpt2.yaml's GPT-2 124M
    seq_len: int  # the model's block_size: the preset trains on full blocks
    ranks: int  # of the DDP and FSDP rows
    backend: str  # of the DDP and FSDP rows, when they have more than one rank
    first_micro_batch: int  # where the search for the largest micro-batch that fits starts
    steps: int  # of each throughput row, logged every `log_interval`
    log_interval: int
    fp16_steps: int
    resume_steps: int  # with a checkpoint every `resume_interval`
    resume_interval: int
    dist_steps: int
    stall_layers: int  # of benchmarks/checkpoint.py's GPT-2 (12: the 124M model)
    small_micro_batch: int = 8  # for the rows that check numerics, not speed
    limits: dict[str, float] = field(default_factory=lambda: {
        "versions": 45, "peak": 60, "eager": 120, "compile": 180, "fp16": 60, "resume": 180, "ddp": 75,
        "fsdp": 75, "stall": 90})  # seconds at most per row; BUDGET_S bounds them all together


def gpu_plan(quick: bool, gpus: int, memory_gib: float) -> Plan:
    # GPT-2 124M in bf16 eager needs roughly 1 GiB per sequence of 1024 tokens (activations and the fp32
    # logits): the largest power of two up to the GPU's GiB is near the limit, and halving finds what fits.
    # 60 steps: the eager row's two saves are 30 steps apart, time for the first 1.5 GB write to land before
    # the second save, which would otherwise wait for it and not show what a later save blocks.
    first = 2 ** int(math.log2(max(1.0, memory_gib)))
    return Plan(device="cuda", model=[], seq_len=1024, ranks=gpus, backend="nccl", first_micro_batch=first,
                steps=30 if quick else 60, log_interval=5, fp16_steps=5 if quick else 10,
                resume_steps=18 if quick else 30, resume_interval=6 if quick else 10,
                dist_steps=10 if quick else 20, stall_layers=12)


def cpu_plan(quick: bool) -> Plan:
    # Two ranks on however many cores: the multi-rank paths run, over gloo.
    return Plan(device="cpu", model=["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"],
                seq_len=64, ranks=2, backend="gloo", first_micro_batch=8, steps=8 if quick else 12, log_interval=2,
                fp16_steps=0, resume_steps=12, resume_interval=3, dist_steps=4 if quick else 6, stall_layers=1)


@dataclass
class Step:
    step: int
    loss: float
    tok_s: float
    mfu: float | None


@dataclass
class Run:
    """One finished subprocess: its exit status and its output, stdout and stderr as they interleaved."""

    name: str
    dir: Path
    rc: int | None
    out: str
    timed_out: bool

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def steps(self) -> list[Step]:
        found = [STEP.match(line) for line in self.lines]
        return [Step(int(m[1]), float(m[2]), float(m[4].replace(",", "")), float(m[5]) / 100 if m[5] else None)
                for m in found if m]

    @property
    def oom(self) -> bool:
        return "out of memory" in self.out.lower()

    def first(self, pattern: re.Pattern) -> re.Match | None:
        return next((m for m in map(pattern.match, self.lines) if m), None)

    def why(self) -> str:
        if self.timed_out:
            return f"{self.name}: killed at the row's time limit"
        # The exception a traceback ends with says more than the trainer's "rank 0/1 failed" after it.
        lines = [line.strip() for line in self.lines if line.strip()]
        raised = [line for line in lines if EXCEPTION.match(line)]
        said = [line for line in lines if line.startswith("gpt-train") and "error" in line]
        return f"{self.name}: exit {self.rc}: {(raised or said or lines or ['no output'])[-1][:300]}"


@dataclass
class Outcome:
    result: str
    ok: bool | None  # None: skipped, with the reason as the result
    target: str = ""  # when the target depends on what the row found (the GPU's peak)


@dataclass
class Row:
    what: str
    result: str
    target: str
    verdict: str
    seconds: float


def speed(run: Run) -> tuple[float, float | None]:
    """Median tokens/s and MFU over the logged intervals after the first (start-up, compilation)."""
    timed = run.steps[1:] or run.steps
    mfus = [s.mfu for s in timed if s.mfu is not None]
    return statistics.median(s.tok_s for s in timed), statistics.median(mfus) if mfus else None


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(Store(str(run_dir)), METRICS) if "loss" in r}


class Check:
    def __init__(self, plan: Plan, tmp: Path, started: float):
        self.plan, self.tmp = plan, tmp
        self.deadline = started + BUDGET_S
        self.row_deadline = self.deadline
        self.data = tmp / "data"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.eager: tuple[int, Run] | None = None  # (micro-batch, run): the later rows start from it
        self.ddp_losses: dict[int, float] = {}

    # -- running things ------------------------------------------------------------------------------

    def command(self, name: str, cmd: list[str], kill_when: Callable[[str], bool] | None = None) -> Run:
        """Run `cmd` until it ends or the row's time is up (then its whole process group is killed); with
        `kill_when`, SIGKILL the process itself at the first output line for which it is true."""
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # a group of its own: torchrun's ranks too
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(0.0, self.row_deadline - time.monotonic()), expire)
        timer.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if kill_when and kill_when(line):
                    proc.kill()  # SIGKILL, to the trainer alone: the kill -9 of the resume row
                    kill_when = None
            proc.wait()
        finally:
            timer.cancel()
        return Run(name, self.tmp / name, proc.returncode, "".join(lines), timed_out.is_set())

    def train(self, name: str, micro_batch: int, *overrides: str, torchrun_ranks: int = 0,
              kill_when: Callable[[str], bool] | None = None) -> Run:
        """`gpt-train train gpt2` on the prepared corpus, one micro-batch per rank per step, into tmp/name
        (the same name again resumes that run); under torchrun with `torchrun_ranks` ranks, else alone."""
        p = self.plan
        ranks = torchrun_ranks or 1
        launcher = [sys.executable]
        if torchrun_ranks:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd = [*launcher, "-m", "gpt_train", "train", "gpt2", f"data.dir={self.data}", f"run_dir={self.tmp / name}",
               f"train.device={p.device}", *p.model, "train.precision=bf16", f"train.micro_batch={micro_batch}",
               f"train.batch_tokens={micro_batch * p.seq_len * ranks}", "train.eval_interval=0",
               "train.eval_batches=1", "train.sample_tokens=0", "schedule.warmup_steps=2", "checkpoint.keep_last=1",
               "logging.wandb=off", *overrides]
        return self.command(name, cmd, kill_when)

    def need(self, run: Run) -> Run:
        if run.rc != 0:
            print(f"gpu_check: {run.name} failed; the end of its output:\n" + "\n".join(run.lines[-25:]),
                  file=sys.stderr, flush=True)
            raise Failed(run.why())
        return run

    def largest_fit(self, name: str, start: int, *overrides: str) -> tuple[int, Run, list[int]]:
        """The first power of two from `start` down whose run does not run out of memory."""
        too_big, micro = [], start
        while True:
            run = self.train(f"{name}-mb{micro}", micro, *overrides)
            if run.rc == 0 or not run.oom or micro == 1:
                return micro, self.need(run), too_big
            too_big.append(micro)
            shutil.rmtree(run.dir, ignore_errors=True)
            micro //= 2

    # -- the rows ------------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        p, on_gpu = self.plan, self.plan.device == "cuda"
        stall_target = (f"the trainer's later saves block <= {STALL_TARGET:.0%} of a synchronous torch.save" if on_gpu
                        else f"reported (the {STALL_TARGET:.0%} target is judged on a GPU, for 124M)")
        specs = [
            ("versions", "versions", f"{p.backend} available, `gpt-train env` finds no problem", self.versions),
            ("peak", "bf16 matmul peak", f">= {HEALTHY_PEAK:.0%} of the datasheet's dense peak" if on_gpu
             else "measured (a CPU has no datasheet peak: MFU is against this)", self.peak),
            ("eager", "GPT-2 bf16 eager", "runs, finite loss (the speed targets are the compiled row's)", self.bf16_eager),
            ("compile", "GPT-2 bf16 compile", f">= {TARGET_TOK_S:,} tok/s per GPU on an H100-class GPU, MFU >= "
             f"{TARGET_MFU:.0%}" if on_gpu else f"runs, finite loss (>= {TARGET_TOK_S:,} tok/s and MFU >= "
             f"{TARGET_MFU:.0%} are GPU targets)", self.bf16_compile),
            ("fp16", "GPT-2 fp16 + GradScaler", "finite losses, scaler state in the checkpoint", self.fp16),
            ("resume", "kill -9 + resume", "losses and weights bit-identical (train.deterministic=true)", self.resume),
            ("ddp", f"DDP, {p.ranks} rank(s)", self.dist_target(), lambda: self.dist("ddp")),
            ("fsdp", f"FSDP2, {p.ranks} rank(s)", self.dist_target() + "; losses within 2% of DDP's",
             lambda: self.dist("fsdp")),
            ("stall", f"checkpoint stall, GPT-2 {p.stall_layers}L + AdamW", stall_target, self.stall),
        ]
        done = []
        for key, what, target, run_row in specs:
            done.append(self.row(key, what, target, run_row))
            r = done[-1]
            print(f"gpu_check: {r.what}: {r.verdict} ({r.seconds:.0f} s) {r.result}", file=sys.stderr, flush=True)
        return done

    def dist_target(self) -> str:
        p = self.plan
        if p.ranks == 1:
            return "one rank under torchrun (one GPU: no process group), finite losses"
        return f"every rank over {p.backend}, finite losses"

    def row(self, key: str, what: str, target: str, run_row: Callable[[], Outcome]) -> Row:
        start = time.monotonic()
        left = self.deadline - start
        if left < MIN_ROW_S:
            return Row(what, f"not run: {left:.0f} s of the {BUDGET_S} s budget left", target, "FAIL", 0.0)
        self.row_deadline = start + min(self.plan.limits[key], left)
        before = set(self.tmp.iterdir())
        try:
            outcome = run_row()
        except Failed as e:
            outcome = Outcome(str(e), False)
        except Exception as e:  # a bug or an unforeseen answer fails this row, not the check
            traceback.print_exc()
            outcome = Outcome(f"{type(e).__name__}: {e}", False)
        for made in set(self.tmp.iterdir()) - before:  # checkpoints of 124M are 1.5 GB each: not kept
            shutil.rmtree(made, ignore_errors=True)
        verdict = "skip" if outcome.ok is None else "pass" if outcome.ok else "FAIL"
        return Row(what, outcome.result, outcome.target or target, verdict, time.monotonic() - start)

    def versions(self) -> Outcome:
        p = self.plan
        run = self.command("env", [sys.executable, "-m", "gpt_train", "env", "gpt2", f"data.dir={self.data}",
                                   f"run_dir={self.tmp / 'env'}", f"train.device={p.device}", "--json"])
        start = run.out.find("\n{") + 1 if not run.out.startswith("{") else 0
        try:
            report = json.JSONDecoder().raw_decode(run.out[start:])[0]
        except json.JSONDecodeError:
            raise Failed(run.why()) from None
        s, gpus = report["software"], report["devices"]["cuda"]
        result = (f"torch {s['torch']}, CUDA {s['cuda'] or 'none'}, cuDNN {s['cudnn'] or 'none'}, "
                  f"NCCL {s['nccl'] or 'none'}, driver {driver_version()}; ")
        if gpus:
            result += f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB)"
        else:
            result += f"CPU {report['devices']['cpu']['name']}, {report['devices']['cpu']['cores']} cores"
        problems = report["problems"] + ([] if s["backends"][p.backend] else [f"no {p.backend} backend in this torch"])
        return Outcome(result + "".join(f"; problem: {x}" for x in problems), not problems)

    def peak(self) -> Outcome:
        run = self.need(self.command("peak", [sys.executable, __file__, "--measure-peak", "--device", self.plan.device]))
        found = json.loads(run.lines[-1])
        measured, datasheet = found["measured"], found["datasheet"]
        result = f"{measured / 1e12:.3g} TFLOP/s (torch.mm {found['n']}x{found['n']}, fastest call)"
        if self.plan.device == "cpu":
            return Outcome(result, measured > 0)
        if not datasheet:
            return Outcome(result + f"; no datasheet number for {found['name']}", measured > 0,
                           "measured (MFU is against this: no datasheet peak for this GPU)")
        share = measured / datasheet
        return Outcome(result + f" = {share:.0%} of {found['name']}'s {datasheet / 1e12:.4g}", share >= HEALTHY_PEAK)

    def throughput(self, run: Run, micro: int, too_big: list[int]) -> str:
        tok_s, mfu = speed(run)
        fits = f" ({', '.join(map(str, too_big))}: out of memory)" if too_big else ""
        return (f"micro-batch {micro}{fits}: {tok_s:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")
                + f", loss {run.steps[0].loss:.3f} -> {run.steps[-1].loss:.3f}")

    def bf16_eager(self) -> Outcome:
        p = self.plan
        # Two saves: the first allocates the staging buffers, the second shows what every later save blocks.
        micro, run, too_big = self.largest_fit("eager", p.first_micro_batch, "train.compile=false",
                                               f"train.max_steps={p.steps}", f"train.log_interval={p.log_interval}",
                                               f"checkpoint.interval={p.steps // 2}")
        self.eager = micro, run
        return Outcome(self.throughput(run, micro, too_big), bool(run.steps))

    def bf16_compile(self) -> Outcome:
        p = self.plan
        # Compiled graphs need no more memory than eager: the search starts at the eager row's micro-batch.
        start = self.eager[0] if self.eager else p.first_micro_batch
        micro, run, too_big = self.largest_fit("compile", start, "train.compile=true", f"train.max_steps={p.steps}",
                                               f"train.log_interval={p.log_interval}", "checkpoint.interval=0")
        tok_s, mfu = speed(run)
        result = self.throughput(run, micro, too_big)
        if p.device == "cpu":
            return Outcome(result, bool(run.steps))
        device = run.first(DEVICE)
        peak = float(device[2]) * 1e12 if device and device[2] else 0.0
        mfu_ok = mfu is not None and mfu >= TARGET_MFU
        if peak >= H100_BF16:
            return Outcome(result, mfu_ok and tok_s >= TARGET_TOK_S,
                           f">= {TARGET_TOK_S:,} tok/s per GPU (llm.c on an H100), MFU >= {TARGET_MFU:.0%} of "
                           f"{peak / 1e12:.4g} TFLOP/s")
        return Outcome(result, mfu_ok, f"MFU >= {TARGET_MFU:.0%} of {peak / 1e12:.4g} TFLOP/s ({TARGET_TOK_S:,} tok/s "
                                       "is an H100 figure: not judged on a slower GPU)")

    def fp16(self) -> Outcome:
        p = self.plan
        refused = precision.check("fp16", torch.device(p.device))
        if refused:
            return Outcome(f"skipped: {refused}", None)
        run = self.need(self.train("fp16", p.small_micro_batch, "train.precision=fp16", "train.compile=false",
                                   f"train.max_steps={p.fp16_steps}", "train.log_interval=1", "checkpoint.interval=0"))
        device = run.first(DEVICE)
        if not device or device[1] != "fp16":
            raise Failed(f"the run did not train in fp16: {device[0] if device else 'no device line'}")
        steps = run.steps
        if len(steps) != p.fp16_steps or not all(math.isfinite(s.loss) for s in steps):
            raise Failed(f"{len(steps)} of {p.fp16_steps} steps logged a finite loss")
        scaler = load(str(run.dir / step_folder(p.fp16_steps)), ("optimizer",)).optimizer["scaler"]
        if not scaler or not math.isfinite(scaler["scale"]) or scaler["scale"] <= 0:
            raise Failed(f"the checkpoint's optimizer.pt holds no usable GradScaler state: {scaler}")
        return Outcome(f"{len(steps)} steps, loss {steps[0].loss:.3f} -> {steps[-1].loss:.3f}; optimizer.pt holds "
                       f"the scaler: scale {scaler['scale']:g}, growth tracker {scaler.get('_growth_tracker')}", True)

    def resume(self) -> Outcome:
        """The project's kill -9 test (tests/test_checkpoint.py) on this device: an uninterrupted run, and the
        same run killed after a checkpoint landed and started again, must log the same loss at every step."""
        p = self.plan
        n = p.resume_steps
        same = ["train.deterministic=true", "train.compile=false", f"train.max_steps={n}", "train.log_interval=1",
                f"checkpoint.interval={p.resume_interval}"]
        ref = self.need(self.train("resume-ref", p.small_micro_batch, *same))
        landed, killed_at = 0, 0

        def after_a_checkpoint(line: str) -> bool:
            nonlocal landed, killed_at
            if m := SAVED.match(line):
                landed = int(m[1])
            elif (m := STEP.match(line)) and 0 < landed < int(m[1]) < n:
                killed_at = int(m[1])
            return bool(killed_at)

        killed = self.train("resume-run", p.small_micro_batch, *same, kill_when=after_a_checkpoint)
        if not killed_at:
            raise Failed(f"no step came after a landed checkpoint before the run ended: {killed.why()}")
        if killed.rc != -signal.SIGKILL:
            raise Failed(f"the killed run exited {killed.rc}, not by SIGKILL")
        resumed = self.need(self.train("resume-run", p.small_micro_batch, *same))
        at = RESUMING.search(resumed.out)  # inside the "run:" line
        if not at:
            raise Failed("the second start did not resume from a checkpoint")
        a, b = losses(ref.dir), losses(resumed.dir)
        differ = sorted(s for s in a.keys() | b.keys() if a.get(s) != b.get(s))
        if differ:
            raise Failed(f"losses differ from the uninterrupted run at step(s) {differ[:8]} "
                         f"(first: {a.get(differ[0])} vs {b.get(differ[0])})")
        wa = load(str(ref.dir / step_folder(n)), ("model",)).model
        wb = load(str(resumed.dir / step_folder(n)), ("model",)).model
        unequal = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
        if unequal or wa.keys() != wb.keys():
            raise Failed(f"the final weights differ: {(unequal or sorted(wa.keys() ^ wb.keys()))[:4]}")
        return Outcome(f"SIGKILL at step {killed_at} (checkpoint {landed} had landed), resumed from step {at[1]}: "
                       f"all {len(a)} losses and {len(wa)} final weight tensors equal the uninterrupted run's", True)

    def dist(self, strategy: str) -> Outcome:
        p = self.plan
        # Half the eager row's micro-batch: DDP's gradient buckets need memory that the search did not leave.
        micro = max(1, (self.eager[0] if self.eager else p.first_micro_batch) // 2)
        run = self.need(self.train(strategy, micro, f"distributed.strategy={strategy}",
                                   f"distributed.backend={p.backend}", "train.compile=false",
                                   f"train.max_steps={p.dist_steps}", "train.log_interval=1", "checkpoint.interval=0",
                                   torchrun_ranks=p.ranks))
        world = run.first(WORLD)
        expected = p.backend if p.ranks > 1 else "none"
        if not world or int(world[1]) != p.ranks or world[2] != expected:
            raise Failed(f"expected {p.ranks} rank(s) over {expected}, the run says: {world[0] if world else 'nothing'}")
        steps = run.steps
        if len(steps) != p.dist_steps or not all(math.isfinite(s.loss) for s in steps):
            raise Failed(f"{len(steps)} of {p.dist_steps} steps logged a finite loss")
        tok_s, _ = speed(run)
        result = (f"{p.ranks} rank(s), backend {world[2]}, micro-batch {micro} per rank: {tok_s:,.0f} tok/s "
                  f"({tok_s / p.ranks:,.0f} per rank), loss {steps[0].loss:.3f} -> {steps[-1].loss:.3f}")
        mine = {s.step: s.loss for s in steps}
        if strategy == "ddp":
            self.ddp_losses = mine
            return Outcome(result, True)
        if not self.ddp_losses:
            raise Failed(result + "; no DDP losses to compare with (the DDP row failed)")
        # The same samples from the same initial weights: only the reduction order and FSDP's bf16 parameter
        # copies differ from DDP, so the losses stay close; a wrong shard or a missed all-gather does not.
        apart = max(abs(mine[s] - self.ddp_losses[s]) / abs(self.ddp_losses[s]) for s in mine.keys() & self.ddp_losses.keys())
        return Outcome(result + f"; at most {apart:.2%} from DDP's losses", apart <= 0.02)

    def stall(self) -> Outcome:
        """The trainer's own "training blocked" for a later save on this device, against benchmarks/checkpoint.py's
        synchronous torch.save of the same state (GPT-2 124M + AdamW); the benchmark's own saves as context."""
        p = self.plan
        run = self.need(self.command("stall", [sys.executable, str(REPO / "benchmarks" / "checkpoint.py"),
                                               "--layers", str(p.stall_layers), "--storage", "local"]))
        rows = [r for r in markdown_rows(run.out) if r.get("storage") == "local"]
        if not rows:
            raise Failed("benchmarks/checkpoint.py printed no row for local storage")
        sync = float(rows[0]["sync torch.save s"])
        ways = [(r.get("write", "CheckpointManager"), float(r["later saves blocked s"])) for r in rows]
        result = (f"benchmarks/checkpoint.py, {rows[0]['state GB']} GB held on the CPU: sync torch.save {sync:.2f} s, "
                  "later saves blocked " + ", ".join(f"{way} {secs:.2f} s ({secs / sync:.0%})" for way, secs in ways))
        trainer = self.trainer_stall()
        if not trainer:
            raise Failed(result + "; no second save in the eager row's output")
        blocked, note = trainer
        result += f"; {note}"
        if p.model or p.stall_layers != 12:  # the trainer's model is not the benchmark's: no ratio to judge
            return Outcome(result, True)
        if blocked is None:
            return Outcome(result + ": no figure for a save that found its buffers free", False)
        return Outcome(result + f" = {blocked / sync:.0%} of the sync save", blocked / sync <= STALL_TARGET)

    def trainer_stall(self) -> tuple[float | None, str] | None:
        """What the eager row's trainer printed for its second save, in seconds: None when that save also waited
        for the first one's write, which the trainer does before it reuses the buffers."""
        if not self.eager:
            return None
        run = self.eager[1]
        snapshots = [(i, m) for i, m in enumerate(map(SNAPSHOT.match, run.lines)) if m]
        if len(snapshots) < 2:
            return None
        first, (later_at, later) = snapshots[0][1], snapshots[1]
        landed_at = next((i for i, m in enumerate(map(SAVED.match, run.lines)) if m and int(m[1]) == int(first[1])),
                         None)
        note = (f"the trainer on {self.plan.device} (eager row) blocked {first[2]} ms at step {first[1]}, "
                f"then {later[2]} ms at step {later[1]}")
        if landed_at is None or landed_at > later_at:
            return None, note + " (that save also waited for the first write to land)"
        return int(later[2]) / 1000, note


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, each keyed by the column names."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    return [dict(zip(cells(lines[0]), cells(line))) for line in lines[2:]] if lines else []


def driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none" if not torch.cuda.is_available() else "unknown (no nvidia-smi)"
    out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return (out.stdout.split() or ["unknown"])[0]


def measure_peak(device: str) -> int:
    """The --measure-peak worker: in a process of its own, so that the check itself never holds GPU memory."""
    where = "cuda:0" if device == "cuda" else "cpu"
    n = 8192 if device == "cuda" else 2048  # measured_peak's sizes
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    datasheet = precision.GPU_PEAKS.get(name, {}).get("bf16")
    measured = precision.measured_peak(torch.bfloat16, n=n, device=where)
    print(json.dumps({"measured": measured, "datasheet": datasheet, "name": name, "n": n}))
    return 0


def table(rows: list[Row], header: list[str]) -> str:
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    out = ["## GPU check", "", *[f"- {h}" for h in header], "", "| check | result | target | verdict | s |",
           "|---|---|---|---|---:|"]
    out += [f"| {cell(r.what)} | {cell(r.result)} | {cell(r.target)} | {r.verdict} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same rows on the CPU with a tiny model (how the check is tested)")
    parser.add_argument("--quick", action="store_true", help="fewer steps per row")
    parser.add_argument("--out", metavar="FILE", help="also write the table (markdown) to FILE")
    parser.add_argument("--measure-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_peak:
        return measure_peak(args.device)
    started = time.monotonic()
    if args.device == "cpu":
        plan, machine = cpu_plan(args.quick), f"CPU, {os.cpu_count()} cores (--device cpu: a tiny model, not GPT-2 124M)"
    else:
        try:
            gpus = distributed.cuda_device_count()
        except UserError as e:  # GPUs that CUDA cannot use: a machine that is not ready, not one without GPUs
            print(f"gpu_check: {e}")
            return 1
        if not gpus:
            print("gpu_check: no GPU on this machine (torch sees no CUDA device): nothing run; "
                  "`--device cpu` runs the same rows on the CPU")
            return 0
        props = torch.cuda.get_device_properties(0)
        plan = gpu_plan(args.quick, gpus, props.total_memory / 2**30)
        machine = f"{gpus} x {props.name}"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(plan, Path(tmp), started)
        # 5% for validation: 15 windows of 1024 tokens, so that the final evaluation has one for each of 8 ranks.
        prepared = subprocess.run([sys.executable, "-m", "gpt_train", "prepare", bundled_corpus(), "--out",
                                   str(check.data), "--val-fraction", "0.05"], cwd=REPO, capture_output=True, text=True,
                                  timeout=120)
        if prepared.returncode != 0:  # every row trains on it
            print(f"gpu_check: preparing the bundled corpus failed:\n{prepared.stdout}{prepared.stderr}", file=sys.stderr)
            return 1
        rows = check.rows()
    header = [f"machine: {machine}, torch {torch.__version__}",
              f"command: python {' '.join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))}",
              f"{time.monotonic() - started:.0f} s of the {BUDGET_S} s budget; data: the bundled corpus, "
              f"{'quick: fewer steps' if args.quick else 'full step counts'}"]
    text = table(rows, header)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
