"""`gpt-train train CONFIG [key=value ...]`: the training loop, top to bottom.

The same code runs as one process, under torchrun, under srun and under submitit: the launcher
only changes what `distributed.detect_world()` finds. Who owns which state:

    TrainState              step, tokens seen, best val loss, run id            meta.json
    data.Loader             the position in the sample stream                   meta.json
    rng.RankRNG             this rank's random generators                       rng.pt (every rank's)
    optim.OptimizerState    AdamW's moments and the fp16 loss scaler            optimizer.pt
    parallel.ModelState     the weights                                          model.pt
    checkpoint.CheckpointManager   composes them into checkpoints, picks the resume point, decides when to save
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

import gpt_train
from gpt_train import collectives, data, distributed, optim, parallel, precision, protocol, recovery, remote, rundir
from gpt_train.checkpoint import Checkpoint, CheckpointManager
from gpt_train.config import Config, dump, load_config, micro_batch_for, resolve_vocab, to_dict, validate, with_epochs
from gpt_train.config import warnings as config_warnings
from gpt_train.errors import ConfigError, DataError, OutOfMemory, TrainingDiverged, UserError
from gpt_train.evaluate import val_loss
from gpt_train.faults import Faults, node_name
from gpt_train.lease import Lease, RunDirBusy
from gpt_train.mixture import Corpus
from gpt_train.model import GPT
from gpt_train.preemption import Preemption, slurm_end_time
from gpt_train.preflight import NodeUnhealthy
from gpt_train.rng import RankRNG
from gpt_train.runlog import JsonlFile, RunLog, read_jsonl
from gpt_train.storage import Store
from gpt_train.tokenizer import from_identity
from gpt_train.watchdog import Watchdog


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="default", help="config file or preset name (default: the small CPU preset)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 compile=false")


def run(args: argparse.Namespace) -> int:
    return train(load_config(args.config, args.overrides))


def train(cfg: Config) -> int:
    """Train or resume the run of `cfg` as one rank of whatever launched this process; the exit code.

    An exception on any rank ends this rank at once, with its traceback, and without waiting for the others
    (a barrier would hold them all until the collective timeout): the peers' next collective fails."""
    p = cfg.preemption
    preempt = Preemption(p.signals, slurm_end_time(), p.deadline_margin_s, p.grace_s)  # first: a signal may come now
    world = distributed.detect_world()
    corpus = _corpus(cfg, world)
    cfg = resolve_vocab(cfg, corpus.tokenizer, corpus.tokenizer_dir)
    validate(cfg, world.world_size)
    if cfg.train.epochs:
        cfg = _length_in_epochs(cfg, corpus, world)
        validate(cfg, world.world_size)
    device = distributed.pick_device(cfg.train.device, world)
    backend = distributed.init(world, device, cfg.distributed)
    trainer = None
    try:
        trainer = Trainer(cfg, world, device, backend, corpus)
        rc = trainer.fit(preempt)
    except UserError:
        distributed.shutdown(clean=False)
        raise
    except NodeUnhealthy:
        distributed.shutdown(clean=False)
        return protocol.EXIT_BAD_NODE
    except Exception as e:
        oom = out_of_memory(e, cfg, world, device, built=trainer is not None)
        if oom:
            if trainer:
                trainer.record_crash(e, exit_code=oom.exit_code)
            distributed.shutdown(clean=False)
            raise oom from None
        traceback.print_exc()
        print(f"gpt-train train: rank {world.rank}/{world.world_size} failed; leaving the process group without "
              "waiting for the other ranks", file=sys.stderr, flush=True)
        if trainer:
            trainer.record_crash(e)
        distributed.shutdown(clean=False)
        raise SystemExit(1) from None
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    finally:
        if trainer:
            trainer.close()
    distributed.shutdown(clean=True)
    return rc


def out_of_memory(error: BaseException, cfg: Config, world: distributed.World, device: torch.device,
                  built: bool) -> OutOfMemory | None:
    """What to change when the device ran out of memory (CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError), else None: a restart with the same settings would only fail again. BUILT: whether the model
    and its optimizer were in place, so that a step or an evaluation ran out, not the model itself."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or
            (isinstance(error, RuntimeError) and "can't allocate memory" in text)):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator's message is one long line
    what = f"could not allocate {int(asked[1]) / 1e9:.1f} GB" if asked else next(iter(text.strip().splitlines()), "")
    if built:
        micro = micro_batch_for(cfg, world.world_size)
        problem = f"a forward of {micro} sequences of {cfg.seq_len} tokens per rank does not fit"
        advice = [f"lower train.micro_batch (now {cfg.train.micro_batch}; {max(1, micro // 2)} would halve the "
                  f"activations): train.batch_tokens ({cfg.train.batch_tokens:,}) stays the same, in more "
                  "accumulation steps"]
        if device.type == "cuda" and cfg.train.precision == "fp32":
            advice.append("train.precision=bf16 halves them again")
    else:
        m = cfg.model
        problem = f"the model ({m.n_layer} layers x {m.n_embd} wide) with its gradients and AdamW state does not fit"
        advice = ["choose a smaller model"]
    if world.world_size > 1 and cfg.distributed.strategy == "ddp":
        advice.append("distributed.strategy=fsdp shards the weights and the optimizer state over the ranks")
    return OutOfMemory(f"out of memory on {device} (rank {world.rank}): {what[:300]}; {problem}. To fit, "
                       + "; ".join(advice))


def _length_in_epochs(cfg: Config, corpus: Corpus, world: distributed.World) -> Config:
    """train.max_steps from train.epochs: the train split's size decides how many steps a pass takes."""
    splits = corpus.splits("train", cfg.seq_len, remote.cache_at(cfg.data.cache_dir, cfg.data.cache_gb))
    per_epoch = corpus.stream(splits, cfg.train.seed).samples_per_epoch()
    cfg = with_epochs(cfg, per_epoch)
    if world.is_main:
        print(f"train.epochs={cfg.train.epochs:g}: {per_epoch:,.0f} sequences of {cfg.seq_len} tokens make a pass"
              + (" over the most repeated source" if corpus.mixed else "")
              + f", {cfg.train.batch_tokens // cfg.seq_len} per step: train.max_steps={cfg.train.max_steps:,}",
              flush=True)
    return cfg


def _corpus(cfg: Config, world: distributed.World) -> Corpus:
    """The prepared data, described; the embedded default's data is prepared on first use."""
    if not world.distributed:
        from gpt_train.prepare import ensure_bundled

        for source in cfg.data.mixture():
            ensure_bundled(source.dir)
    return Corpus(cfg.data)


def _exit_recorded(code: int) -> None:
    """How the watchdog ends a stuck process: no Python cleanup can run, and the launcher must still learn
    the code (protocol.record_exit)."""
    protocol.record_exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _joined(fn, timeout_s: float) -> bool:
    """Run fn on a thread and wait at most timeout_s for it: whether it returned."""
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def slurm_job() -> str | None:
    """The id that names this job alone: an array task's SLURM_JOB_ID can be the whole array's, which scancel and
    scontrol read so (the launcher exports ARRAYID_TASKID)."""
    return os.environ.get("GPT_TRAIN_SLURM_JOB") or os.environ.get("SLURM_JOB_ID")


def launcher_fields(env: dict[str, str] | None = None) -> dict:
    """What the start event says of whoever launched this attempt, for `gpt-train runs`, `logs` and `cancel`:
    where its output goes, and how to stop it (the SLURM job, the local supervisor, the container)."""
    env = os.environ if env is None else env
    container = env.get("GPT_TRAIN_CONTAINER") or None
    launcher = "slurm" if env.get("SLURM_JOB_ID") else "docker" if container else \
        "local" if env.get(protocol.LAUNCH_VAR) else None
    pid = env.get("GPT_TRAIN_SUPERVISOR_PID", "")
    return {"launcher": launcher, "log": env.get("GPT_TRAIN_LOG") or None, "container": container,
            "supervisor_pid": int(pid) if pid.isdigit() else None,
            "supervisor_host": node_name() if pid.isdigit() else None,  # the supervisor runs on rank 0's node
            "code_commit": env.get("GPT_TRAIN_CODE_COMMIT") or None, "code_dir": env.get("GPT_TRAIN_CODE_DIR") or None}


def count_starts(store: Store) -> int:
    """Earlier starts of this run, refused ones included (the attempt number is one more)."""
    return sum(1 for e in read_jsonl(store, rundir.EVENTS) if e.get("event") in recovery.STARTS + recovery.REFUSALS)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class TrainState:
    """The run's counters: what a resume must continue from, besides the tensors."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    run_id: str = ""
    bad_streak: int = 0  # optimizer steps skipped in a row for a non-finite loss or gradient norm
    skipped_steps: list[int] = field(default_factory=list)
    # each rollback: {"at_step", "to_step", "skipped_samples": [first, end)}: the data window the loader moved past
    rollbacks: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss, "run_id": self.run_id,
                "bad_streak": self.bad_streak, "skipped_steps": list(self.skipped_steps),
                "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_val_loss, self.run_id = state.get("best_val_loss"), state["run_id"]
        self.bad_streak = int(state.get("bad_streak", 0))
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.rollbacks = list(state.get("rollbacks", []))


@dataclass
class StepResult:
    loss: float | None  # mean over ranks and micro-batches; only on logging steps (it costs a sync)
    grad_norm: float
    lr: float
    skipped: bool = False  # not applied: the loss or the gradient norm was not finite


class Trainer:
    """One rank's training run: built from the config, resumed by its CheckpointManager, run by `fit`."""

    def __init__(self, cfg: Config, world: distributed.World, device: torch.device, backend: str | None,
                 corpus: Corpus):
        self.cfg, self.world, self.device, self.backend = cfg, world, device, backend
        self.say = print if world.is_main else (lambda *a, **k: None)
        self.corpus = corpus
        self._setup_numerics()
        self.store = Store(cfg.run_dir)
        self.lease, self.lease_note = self._hold_run_dir()
        try:
            self._start()
        except BaseException:
            if self.lease:  # start-up failed before any step: the run directory is free again at once
                self.lease.release()
            raise

    def _start(self) -> None:
        cfg, world = self.cfg, self.world
        self.state = TrainState()
        self.ckpt: CheckpointManager | None = None
        self.watchdog: Watchdog | None = None
        self.log: RunLog | None = None
        self.hosts = collectives.all_gather_object(node_name())  # by rank: the events and the node report name them
        self.attempt = collectives.broadcast_object(count_starts(self.store) + 1 if world.is_main else 0)
        self.verdict = self._judge_start()
        if self.verdict:
            return
        self.faults = Faults.from_env(world.rank, self.attempt)
        self.preflight = self._preflight() if cfg.fault.preflight else None
        self.ckpt = CheckpointManager(cfg.checkpoint, cfg.run_dir, world, log=self.say, about={
            "config": to_dict(cfg), "tokenizer": self.corpus.tokenizer, "data_fingerprint": self.corpus.fingerprint(),
            "version": gpt_train.__version__,
            "git_commit": git_commit() if world.is_main else ""})
        found, init, self.start_note = self.ckpt.resume_point()
        self._build(found, init)
        self.ckpt.restore(found)
        if world.is_main:
            self.state.run_id = RunLog.identify(self.store, found and found.meta)  # RUN/run.json

    def _judge_start(self) -> tuple[str, str] | None:
        """Rank 0 records how the previous attempt ended when it could not (a SIGKILL, a lost node), then asks
        the restart policy whether this start may train (recovery.judge); every rank learns the verdict."""
        verdict = None
        if self.world.is_main:
            events, metrics = read_jsonl(self.store, rundir.EVENTS), read_jsonl(self.store, rundir.METRICS)
            end = recovery.unrecorded_end(events, metrics, os.environ.get(protocol.PREVIOUS_EXIT_VAR))
            if end:
                self._append_event(end)
                events.append(end)
            f = self.cfg.fault
            verdict = recovery.judge(events, metrics, recovery.allocation(), f.in_job_restarts,
                                     f.max_restarts_without_progress)
            if verdict:
                self._append_event({"event": verdict[0], "cause": verdict[1], "attempt": self.attempt,
                                    "slurm_job": slurm_job(), "allocation": recovery.allocation()})
        return collectives.broadcast_object(verdict, storage=True)

    def _preflight(self) -> dict:
        """The start-up check of every node (gpt_train/preflight.py); a node that fails it ends this start with
        protocol.EXIT_BAD_NODE, recorded, so that the requeued job leaves it behind."""
        from gpt_train import preflight

        checks = preflight.run(self.world, self.device, self.store, self.faults)
        summary = preflight.summary(checks)
        bad = preflight.failed_hosts(checks)
        if bad and self.world.is_main:
            self._append_event({"event": "bad_node", "attempt": self.attempt, "hosts": bad, "preflight": summary,
                                "cause": "; ".join(f"{h}: {why}" for h, why in bad.items()),
                                "slurm_job": slurm_job(), "allocation": recovery.allocation()})
        preflight.enforce(checks, self.say)
        return summary

    def _append_event(self, record: dict) -> None:
        """An event written before the run's log opens (rank 0, holding the lease)."""
        events = JsonlFile(self.store, rundir.EVENTS)
        events.append({**record, "time": time.time()})
        events.close()

    def _hold_run_dir(self) -> tuple[Lease | None, str | None]:
        """Rank 0 becomes the run directory's one writer before it reads or changes anything there; every rank
        learns the outcome, so that a busy run directory is the same one line everywhere."""
        lease, note, error = None, None, None
        if self.world.is_main:
            try:
                self.store.check_writable()
                # The other ranks wait for the outcome on the storage group: the wait must end before its timeout.
                lease = Lease(self.store, self.cfg.checkpoint.lease_stale_s,
                              wait_s=max(0.0, self.cfg.distributed.storage_timeout_s - 60.0),
                              settle_s=0.25 if self.store.local else 1.0, log=self.say)
                note = lease.acquire()
            except UserError as e:
                error = e
        note, message = collectives.broadcast_object((note, str(error) if error else None), storage=True)
        if error:
            raise error
        if message:
            raise UserError(message)
        return lease, note

    def close(self) -> None:
        """Give the run directory back, once the checkpoint in flight has landed (a requeued attempt waits for it)."""
        if self.watchdog:
            self.watchdog.stop()
        if self.lease:
            if self.ckpt:
                self.ckpt.wait()
            try:
                self.lease.release()
            except Exception as e:  # the exit code is the run's; an unreleased lease goes stale by itself
                self.say(f"lease: could not release {self.cfg.run_dir}/lease.json ({e}); it goes stale in "
                         f"{self.cfg.checkpoint.lease_stale_s:g} s")

    def _setup_numerics(self) -> None:
        t, device = self.cfg.train, self.device
        self.prec = precision.choose(t.precision, device)
        problem = precision.check(self.prec, device)
        if problem:
            raise ConfigError(problem)
        self.deterministic = device.type == "cpu" if t.deterministic is None else t.deterministic
        precision.make_deterministic(self.deterministic, device)
        if device.type == "cpu":
            precision.reuse_freed_memory()  # large per-step tensors reuse pages instead of faulting in fresh ones

    def _build(self, found: Checkpoint | None, init: Checkpoint | None) -> None:
        """Data, model (weights from the checkpoint, another run's, Hugging Face's or random), optimizer."""
        cfg, world, t = self.cfg, self.world, self.cfg.train
        corpus = self.corpus
        self.tokenizer = from_identity(corpus.tokenizer, corpus.tokenizer_dir)
        cache = remote.cache_at(cfg.data.cache_dir, cfg.data.cache_gb)  # for a data.dir on object storage
        self.train_splits = corpus.splits("train", cfg.seq_len, cache)
        self.val_splits = corpus.splits("val", cfg.seq_len, cache)
        for source, split in zip(corpus.sources, self.val_splits):
            if split.num_windows < world.world_size:  # each rank evaluates its share: none would be empty
                raise DataError(f"the val split of '{source.dir}' has {split.num_windows} sequence(s) of "
                                f"{cfg.seq_len} tokens, fewer than the {world.world_size} ranks: prepare it with a "
                                "larger --val-fraction, or use a smaller train.seq_len")
        self.micro_batch = micro_batch_for(cfg, world.world_size)
        self.loader = data.Loader(corpus.stream(self.train_splits, t.seed), t.batch_tokens // cfg.seq_len,
                                  self.micro_batch, world.rank, world.world_size, prefetch=True,
                                  pin=self.device.type == "cuda", trace=os.environ.get(data.TRACE_VAR))
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.raw_model = GPT(cfg.model)
        self.ckpt.attach(model=parallel.ModelState(self.raw_model))
        if found or init:
            self.ckpt.load_weights(found or init)
        elif cfg.model.init_from:
            from gpt_train.hf import load_hf_gpt2

            load_hf_gpt2(self.raw_model, cfg.model.init_from)
        self.raw_model.to(self.device)
        model = torch.compile(self.raw_model) if t.compile else self.raw_model
        self.model = parallel.wrap(model, world, self.device, cfg)  # DDP, FSDP2 (shards raw_model in place), or itself
        self.optimizer = optim.build_optimizer(self.raw_model, cfg, self.device.type)  # after wrap: FSDP2 swaps params
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.prec == "fp16")
        self.ckpt.attach(train=self.state, loader=self.loader, rng=RankRNG(t.seed, world.rank, self.device),
                         optimizer=optim.OptimizerState(self.raw_model, self.optimizer, self.scaler))

    def _announce(self) -> None:
        """Everything chosen, before the first step: a wrong choice is seen at once, not after the job."""
        cfg, world, t, say, m = self.cfg, self.world, self.cfg.train, self.say, self.corpus.metas[0]
        peak = self.peak
        accum = self.loader.accum_steps
        say(f"world: {world.describe()}, backend {self.backend or 'none'}"
            + (f", strategy {cfg.distributed.strategy}, master {world.master_addr}:{world.master_port}"
               if world.distributed else ""))
        say(f"device: {self.device}, precision {self.prec}, compile {t.compile}, deterministic {self.deterministic}"
            + (f", MFU against {peak / 1e12:.3g} TFLOP/s" if peak else ""))
        say(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, "
            f"{cfg.model.n_embd} wide, vocab {cfg.model.vocab_size} ({m['tokenizer']['name']})")
        bound = (f" (the most up to train.micro_batch={t.micro_batch} that divides a rank's share)"
                 if self.micro_batch != t.micro_batch else "")
        train_tokens, val_tokens = (sum(s.tokens for s in splits) for splits in (self.train_splits, self.val_splits))
        say(f"data: {train_tokens:,} train / {val_tokens:,} val tokens in {self.corpus.describe()}; "
            f"batch {t.batch_tokens:,} tokens = {self.micro_batch} seq{bound} x {cfg.seq_len} x {world.world_size} "
            f"rank(s) x {accum} accumulation step(s)")
        say(f"run: {cfg.run_dir} (id {self.state.run_id}, start {self.attempt}); {self.start_note}")
        for warning in config_warnings(cfg):
            say(f"warning: {warning}")
        if self.faults:
            print(f"fault injection on rank {world.rank}: {self.faults.describe()}", flush=True)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, preempt: Preemption) -> int:
        cfg, t = self.cfg, self.cfg.train
        if self.verdict:
            kind, why = self.verdict
            code = protocol.EXIT_REQUEUE if kind == "requeue" else protocol.EXIT_GAVE_UP
            self.say(f"restart policy: {why} (exit {code})", flush=True)
            return code
        self.peak = precision.peak_flops(self.device, self.prec) if self.world.is_main else None
        self._announce()
        if self.state.step >= t.max_steps:
            self.say(f"run already complete at step {self.state.step}/{t.max_steps}: nothing to do")
            return protocol.EXIT_OK
        self._open_log()
        if collectives.any_rank(preempt.received is not None, self.device):  # signalled while starting: nothing new
            preempt.acting()
            resumed = self.state.step > 0
            self.say(f"preemption: {preempt.received or 'a peer rank was signalled'} before the first step: exiting "
                     f"with {protocol.EXIT_REQUEUE} to be requeued; "
                     + ("the checkpoint it started from stands" if resumed else "nothing was trained yet"), flush=True)
            return self._stop(preempt.received or "peer", landed=resumed)
        if preempt.deadline:
            self.say(f"deadline: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(preempt.deadline))}; the run "
                     f"checkpoints and exits {cfg.preemption.deadline_margin_s} s before it")
        self.model.train()
        self.watchdog = Watchdog(cfg.fault, self.store, self.world.rank, self.world.world_size, self.attempt,
                                 self.hosts[self.world.rank], self.backend,
                                 on_hang=self._on_hang if self.world.is_main else None, _exit=_exit_recorded)
        self.watchdog.start()
        self.ckpt.start_clock()
        self._first_step = self.state.step
        self._clock = time.perf_counter(), self.state.step
        step_s, t_step = 0.0, time.perf_counter()
        self.last_loss = torch.zeros((), device=self.device)
        pending = None  # the ranks' flags, summed while the next step runs: no step waits for them
        while self.state.step < t.max_steps:
            result = self.train_step()
            if result.skipped and self._too_many_bad_steps():
                self._roll_back()
                continue
            step, last = self.state.step, self.state.step == t.max_steps
            self._report(result, last)
            val = self._evaluate() if (t.eval_interval and step % t.eval_interval == 0) or last else None
            if t.sample_tokens and ((t.sample_interval and step % t.sample_interval == 0) or last):
                self._sample()
            now = time.perf_counter()
            step_s, t_step = max(step_s * 0.9, now - t_step), now
            if step == self._first_step + 3 and 0 < cfg.preemption.grace_s < 2 * step_s:
                self.say(f"warning: two steps take {2 * step_s:.0f} s, longer than preemption.grace_s="
                         f"{cfg.preemption.grace_s:g}: a SIGTERM would end the run without a new checkpoint")
            reason = preempt.reason(step_s)
            stop, time_due = (flag > 0 for flag in pending.result()) if pending else (False, False)
            stop = stop and not last
            if stop:
                preempt.acting()
                reason = reason or "a peer rank was signalled"
                self.say(f"preemption: {reason} at step {step}: checkpointing, then exiting with "
                         f"{protocol.EXIT_REQUEUE} to be requeued", flush=True)
            if last or stop or time_due or self.ckpt.step_due(step):
                self._save(val, final=last)
            if stop:
                return self._stop(reason)
            # Started after the save, so that a save resets the clock before the ranks ask it again.
            pending = None if last else collectives.PendingSum(
                [float(reason is not None), float(self.ckpt.time_due())], self.device)
        return self._finish(val)

    def train_step(self) -> StepResult:
        """One optimizer step: micro-batches with accumulated gradients, clipping, the update."""
        cfg, t = self.cfg, self.cfg.train
        lr = optim.lr_at(self.state.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.watchdog.progress("step", self.state.step + 1)
        self.faults.before_step(self.state.step + 1)
        # A `nan` fault stands for a corrupt batch: tied to the data that step N reads on the run's first
        # course, so that a rollback past that data leaves it behind, as it would a real one.
        poison = self.faults.corrupts_loss(self.loader.next_sample // self.loader.global_batch + 1)
        micro = self.loader.next_batch()
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step of the accumulation.
            sync = i == len(micro) - 1 or not self.world.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with precision.autocast(self.prec, self.device):
                    _, loss = self.model(x, y)
                if poison:
                    loss = loss * float("nan")
                self.scaler.scale(loss / len(micro)).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        # The norm is measured without clipping too: a non-finite one means this step must not be applied.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                   cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; the same plain number on every rank
            grad_norm = grad_norm.full_tensor()
        skipped = self._bad_step(loss_sum, grad_norm)
        if not skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:  # checked again before every save: a skipped step's loss is not in the weights
            self.last_loss = loss_sum
        self.state.step += 1
        self.state.tokens += t.batch_tokens
        logging = self.state.step % t.log_interval == 0 or self.state.step == t.max_steps
        loss_mean = collectives.all_reduce_mean(loss_sum.item() / len(micro), self.device) if logging else None
        return StepResult(loss_mean, grad_norm.item(), lr, skipped)

    def _bad_step(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step's update must be skipped: its loss on some rank, or the gradient norm, is not
        finite. Costs one small all-reduce and a sync per step. Under fp16 a non-finite gradient alone is the
        loss scaler's business (it skips the step and lowers the scale); a non-finite loss is not."""
        fp16 = self.prec == "fp16"
        norm_bad = torch.zeros_like(loss_sum, dtype=torch.bool) if fp16 else ~torch.isfinite(grad_norm)
        flags = torch.stack([~torch.isfinite(loss_sum), norm_bad]).float()
        if self.world.distributed:
            torch.distributed.all_reduce(flags)
        if not flags.any().item():
            self.state.bad_streak = 0
            return False
        s, max_bad = self.state, self.cfg.fault.max_bad_steps
        if not max_bad:
            raise self._diverged(f"the loss or the gradient norm is not finite at step {s.step + 1} "
                                 "(fault.max_bad_steps=0: no step is skipped)")
        s.bad_streak += 1
        s.skipped_steps.append(s.step + 1)
        self.say(f"step {s.step + 1:>6}: loss or gradient norm not finite: update skipped ({s.bad_streak} in a row, "
                 f"fault.max_bad_steps={max_bad})", flush=True)
        if self.log:
            self.log.event("skipped_step", step=s.step + 1, streak=s.bad_streak,
                           loss_finite=bool(torch.isfinite(loss_sum).item()),
                           grad_norm_finite=bool(torch.isfinite(grad_norm).item()))
        return True

    def _too_many_bad_steps(self) -> bool:
        return self.state.bad_streak >= self.cfg.fault.max_bad_steps

    def _roll_back(self) -> None:
        """Back to the last good checkpoint, and past the data of the steps since then: replaying the same
        batches would bring the same NaN. The rollback is part of the state checkpointed from now on."""
        s = self.state
        at_step, past = s.step, self.loader.next_sample
        self.ckpt.wait()
        found = self.ckpt.last_good()
        if found is None:
            raise self._diverged(f"{s.bad_streak} steps in a row had a non-finite loss or gradient norm, and there "
                                 "is no checkpoint to roll back to")
        if any(r["to_step"] == found.step for r in s.rollbacks):
            raise self._diverged(f"{s.bad_streak} steps in a row had a non-finite loss or gradient norm again after "
                                 f"the rollback to step {found.step} moved past the data that caused them")
        history = {"skipped_steps": s.skipped_steps, "rollbacks": s.rollbacks}
        self.ckpt.load_weights(found)
        self.ckpt.restore(found)
        window = [self.loader.next_sample, past]
        self.loader.next_sample = past
        s.skipped_steps, s.rollbacks, s.bad_streak = history["skipped_steps"], history["rollbacks"], 0
        s.rollbacks.append({"at_step": at_step, "to_step": found.step, "skipped_samples": window})
        self.say(f"rollback: {self.cfg.fault.max_bad_steps} bad steps in a row at step {at_step}: back to the "
                 f"checkpoint of step {found.step}, skipping samples {window[0]}-{window[1] - 1} (the data since "
                 "then)", flush=True)
        if self.log:
            self.log.event("rollback", step=found.step, from_step=at_step, to_step=found.step,
                           skipped_samples=window, cause="non-finite loss or gradient norm")
            self.log.rewind(found.step)
        self._clock = time.perf_counter(), s.step

    # -- what a step reports -----------------------------------------------------------------------

    def _report(self, r: StepResult, last: bool) -> None:
        if r.loss is None:
            return
        t, step = self.cfg.train, self.state.step
        if r.skipped:
            if self.log:
                self.log.metric(step=step, skipped=True, lr=r.lr, tokens=self.state.tokens, time=time.time())
            return
        if not math.isfinite(r.loss):
            raise self._diverged(f"the loss is {r.loss}")
        start, start_step = self._clock
        dt = (time.perf_counter() - start) / max(1, step - start_step)
        self._clock = time.perf_counter(), step
        tok_s = t.batch_tokens / dt
        mfu = self.raw_model.flops_per_token(self.cfg.seq_len) * t.batch_tokens / dt / self.peak if self.peak else None
        self.say(f"step {step:>6}/{t.max_steps} | loss {r.loss:.4f} | lr {r.lr:.2e} | norm {r.grad_norm:.3f} | "
                 f"{dt * 1000:.0f} ms/step | {tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else ""), flush=True)
        if self.log:
            self.log.metric(step=step, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm, tokens=self.state.tokens,
                            step_ms=dt * 1000, tokens_per_s=tok_s, mfu=mfu, epoch=self.loader.epoch, time=time.time())

    def _evaluate(self) -> float:
        t, s = self.cfg.train, self.state
        self.watchdog.progress("eval", s.step)
        losses = [val_loss(self.raw_model, split, t.eval_batches, t.micro_batch, self.world.rank,
                           self.world.world_size, self.device, self.prec) for split in self.val_splits]
        bpbs = self.corpus.bits_per_byte(losses, "val")  # comparable across tokenizers
        loss, bpb = self.corpus.overall(losses), self.corpus.overall(bpbs)
        s.best_val_loss = loss if s.best_val_loss is None else min(s.best_val_loss, loss)
        each = {src.dir: {"val_loss": lo, "val_bpb": b} for src, lo, b in zip(self.corpus.sources, losses, bpbs)}
        self.say(f"step {s.step:>6}/{t.max_steps} | val loss {loss:.4f} | best {s.best_val_loss:.4f}"
                 + (f" | {bpb:.3f} bits/byte" if bpb is not None else "")
                 + ("".join(f" | {where} {v['val_loss']:.4f}" for where, v in each.items()) if self.corpus.mixed else ""),
                 flush=True)
        if self.log:
            self.log.metric(step=s.step, val_loss=loss, val_bpb=bpb, tokens=s.tokens, time=time.time(),
                            **({"val_sources": each} if self.corpus.mixed else {}))
        return loss

    def _sample(self) -> None:
        from gpt_train.sampling import sample

        t, step = self.cfg.train, self.state.step
        self.watchdog.progress("sample", step)
        with parallel.gathered(self.raw_model):  # FSDP: every rank gathers the weights so rank 0 can run alone
            if not self.world.is_main:
                return
            gen = torch.Generator(device=self.device).manual_seed(t.seed + step)  # the training RNG stays untouched
            prompt = self.tokenizer.encode(t.sample_prompt) or [self.tokenizer.eot]
            ids = sample(self.raw_model, prompt, t.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                         eot=self.tokenizer.eot)[0]
        text = t.sample_prompt + self.tokenizer.decode(ids)
        self.say(f"sample at step {step}:\n{text}\n", flush=True)
        self.log.sample(step, text)

    # -- checkpoints, records and the way out ---------------------------------------------------------

    def _open_log(self) -> None:
        if not self.world.is_main:
            return
        self.store.write_text(rundir.CONFIG, dump(self.cfg))
        self.log = RunLog(self.store, resume_step=self.state.step, config=self.cfg)
        self.log.event("resume" if self.state.step else "start", step=self.state.step,
                       world_size=self.world.world_size, attempt=self.attempt, lease=self.lease_note,
                       slurm_job=slurm_job(), restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                       allocation=recovery.allocation(), hosts=sorted(set(self.hosts)), preflight=self.preflight,
                       git_commit=self.ckpt.about.get("git_commit"), **launcher_fields())
        if self.ckpt.rollback:
            self.log.event("rollback", step=self.state.step, **self.ckpt.rollback)
        if self.ckpt.course_changes:
            self.log.event("changed", step=self.state.step, accepted=self.ckpt.course_changes)
        self.say("config:\n" + dump(self.cfg).rstrip())

    def _save(self, val: float | None, final: bool) -> None:
        # A checkpoint of NaN weights would be resumed by every later start: never commit one. Nor one over
        # the checkpoints of another trainer that took the run directory over.
        finite = [torch.isfinite(self.last_loss).all()]
        finite += [torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all() for p in self.raw_model.parameters()]
        lost = bool(self.lease and self.lease.lost)
        not_finite, lost = collectives.all_reduce_sum([float(not torch.stack(finite).all()), float(lost)], self.device)
        if not_finite:
            raise self._diverged("the weights or the loss are not finite")
        if lost:
            raise RunDirBusy(f"another trainer took over {self.cfg.run_dir} (its lease.json is not ours any more): "
                             "this one stops without writing; run one trainer per run_dir")
        self.watchdog.progress("checkpoint", self.state.step)
        blocked = self.ckpt.save(val, final=final)
        if self.log:
            self.log.flush()
            self.say(f"checkpoint: step {self.state.step} snapshot taken, training blocked {blocked * 1000:.0f} ms")

    def _diverged(self, what: str) -> TrainingDiverged:
        """The one line a diverged run ends with (every rank agrees on it), after recording it."""
        o, step = self.cfg.optim, self.state.step
        if self.log:
            self.log.event("diverged", step=step, cause=what, checkpoint_saved=False)
            self.log.close()
        return TrainingDiverged(
            f"training diverged at step {step}: {what}; nothing from it was saved, the newest checkpoint in "
            f"{self.cfg.run_dir} is the last good one. Lower optim.lr (now {o.lr:g}), raise schedule.warmup_steps "
            f"(now {self.cfg.schedule.warmup_steps}) or clip gradients (optim.grad_clip, now {o.grad_clip:g}), then "
            "start again: the run resumes from that checkpoint")

    def record_crash(self, error: BaseException, exit_code: int = 1) -> None:
        """Rank 0's end record of an attempt that an exception ended (here or, seen as a failed collective, on
        another rank): the restart policy and `status` read it."""
        if not self.log:
            return
        line = next(iter(str(error).strip().splitlines()), "")
        self.log.event("crash", step=self.state.step, cause=f"{type(error).__name__}: {line}"[:500],
                       rank=self.world.rank, exit_code=exit_code)
        self.log.close()
        self.log = None

    def _on_hang(self, report: dict) -> None:
        """Rank 0's watchdog saw no progress (the main thread is stuck): record it, name the suspects' nodes for
        the next requeue, and give the run directory back so that the restart need not wait for the lease."""
        # The nodes the requeue leaves behind: those of ranks that could not even dump their stacks, and the one
        # rank stuck outside a collective while every other waits in one. More suspects than that is no verdict.
        suspects = set(report.get("missing", []))
        if len(report.get("suspects", [])) == 1 and len(report.get("in_collective", [])) == self.world.world_size - 1:
            suspects |= set(report["suspects"])
        suspects = {self.hosts[r] for r in suspects if 0 <= r < len(self.hosts)}
        if self.log:
            where = "; ".join(f"rank {r}: {w}" for r, w in sorted(report.get("where", {}).items()))
            self.log.event("hang", **{**report, "step": self.state.step, "attempt": self.attempt,
                                      "cause": f"no progress for {report.get('silent_s', 0):.0f} s (timeout "
                                               f"{report.get('timeout_s', 0):.0f} s); {where}",
                                      "exit_code": protocol.EXIT_HANG, "suspect_hosts": sorted(suspects)})
            self.log.close()
            self.log = None
        for host in sorted(suspects):
            protocol.report_bad_node(host, f"a rank hung at step {self.state.step} (diagnostics: "
                                           f"{report.get('diagnostics', '')})")
        if self.lease and _joined(self.ckpt.wait, timeout_s=60):
            self.lease.release()

    def _stop(self, reason: str, landed: bool | None = None) -> int:
        self._quiet()
        if self.log:
            landed = self.ckpt.wait() if landed is None else landed
            self.log.event("preempted", step=self.state.step, cause=reason, checkpoint_landed=landed)
            self.log.close()
        return protocol.EXIT_REQUEUE

    def _quiet(self) -> None:
        """No more steps: the wait for the last upload, however long, is not a hang."""
        if self.watchdog:
            self.watchdog.stop()

    def _finish(self, val: float | None) -> int:
        self._quiet()
        if not self.log:
            return protocol.EXIT_OK
        landed = self.ckpt.wait()
        step = self.state.step
        self.log.event("finish", step=step, tokens=self.state.tokens, val_loss=val)
        self.log.close()
        where = f"{self.cfg.run_dir}/{rundir.step_folder(step)}" if landed else f"FAILED ({self.ckpt.writer.last_error})"
        self.say(f"done: step {step}, val loss {val:.4f}, checkpoint {where}")
        return protocol.EXIT_OK if landed else 1
