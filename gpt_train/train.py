"""`gpt-train train CONFIG [key=value ...]`: the training loop, top to bottom.

The same code runs as one process, under torchrun, under srun and under submitit: the launcher
only changes what `distributed.detect_world()` finds.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import subprocess
import time

import numpy as np
import torch

import gpt_train
from gpt_train import checkpoint, data, distributed, optim, precision
from gpt_train.preemption import REQUEUE_EXIT, Preemption, slurm_end_time
from gpt_train.config import Config, dump, load_config, to_dict, validate
from gpt_train.errors import CheckpointError, ConfigError, DataError
from gpt_train.model import GPT
from gpt_train.runlog import RunLog
from gpt_train.storage import Store
from gpt_train.tokenizer import from_identity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="default", help="config file or preset name (default: the small CPU preset)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 compile=false")


def run(args: argparse.Namespace) -> int:
    return train(load_config(args.config, args.overrides))


# -- state that is not tensors of the model or optimizer -------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# -- the run -------------------------------------------------------------------------------------

def train(cfg: Config) -> int:
    world = distributed.detect_world()
    validate(cfg, world.world_size)
    device = distributed.pick_device(cfg.train.device, world)
    backend = distributed.init(world, device, cfg.distributed)
    try:
        return _train(cfg, world, device, backend)
    finally:
        distributed.shutdown(world)


def _train(cfg: Config, world: distributed.World, device: torch.device, backend: str | None) -> int:
    say = print if world.is_main else (lambda *a, **k: None)
    t, seq_len = cfg.train, cfg.seq_len

    # Data and tokenizer first: they decide the vocabulary, and a bad path should fail before anything heavy.
    meta = data.read_meta(cfg.data.dir)
    data_vocab = meta["tokenizer"]["n_vocab"]
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size != data_vocab:
        raise ConfigError(f"config key 'model.vocab_size' is {cfg.model.vocab_size} but the data in '{cfg.data.dir}' "
                          f"was tokenized with {meta['tokenizer']['name']} ({data_vocab} tokens)")
    tokenizer = from_identity(meta["tokenizer"], cfg.data.dir)
    train_split = data.Split(cfg.data.dir, "train", seq_len)
    val_split = data.Split(cfg.data.dir, "val", seq_len)

    prec = precision.choose(t.precision, device)
    problem = precision.check(prec, device)
    if problem:
        raise ConfigError(problem)
    deterministic = t.deterministic == "true" or (t.deterministic == "auto" and device.type == "cpu")
    precision.make_deterministic(deterministic, device)
    if device.type == "cpu":
        precision.reuse_freed_memory()  # large per-step tensors reuse pages instead of faulting in fresh ones

    store = Store(cfg.run_dir)
    ckpts = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                    asynchronous=cfg.checkpoint.async_save, log=say)
    if world.is_main:
        store.check_writable()

    # Where to start: decided by rank 0, so that every rank loads the same checkpoint.
    ckpt, init_url, note = _resume_point(cfg, ckpts) if world.is_main else (None, None, "")
    resume_url, init_url, note = distributed.broadcast_object((ckpt and ckpt.url, init_url, note))

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = GPT(cfg.model)
    if resume_url:
        ckpt = ckpt or checkpoint.load(resume_url)
        checkpoint.check_compatible(ckpt.meta, to_dict(cfg)["model"], meta["tokenizer"], resume_url)
        checkpoint.load_model_state(model, ckpt.model, resume_url)
    elif init_url:
        start = checkpoint.load(init_url, parts=("model",))
        checkpoint.check_compatible(start.meta, to_dict(cfg)["model"], meta["tokenizer"], init_url)
        checkpoint.load_model_state(model, start.model, init_url)
    elif cfg.model.init_from:
        from gpt_train.hf import load_hf_gpt2
        load_hf_gpt2(model, cfg.model.init_from)
    model.to(device)

    raw_model = model
    if t.compile:
        model = torch.compile(model)
    model = distributed.wrap(model, world, device, cfg)  # DDP, FSDP2 (shards raw_model in place), or the model
    optimizer = optim.build_optimizer(raw_model, cfg, device.type)  # after wrap: FSDP2 replaces the parameters
    scaler = torch.amp.GradScaler(device.type, enabled=prec == "fp16")
    step, tokens, best_val = 0, 0, None
    run_id = RunLog.identify(store, ckpt and ckpt.meta) if world.is_main else ""  # RUN/run.json
    loader = data.Loader(train_split, t.seed, t.batch_tokens // seq_len, t.micro_batch, world.rank, world.world_size)
    if ckpt:
        distributed.load_optimizer_state(raw_model, optimizer, ckpt.optimizer["optimizer"])
        if ckpt.optimizer.get("scaler"):
            scaler.load_state_dict(ckpt.optimizer["scaler"])
        m = ckpt.meta
        step, tokens, best_val, run_id = m["step"], m["tokens"], m.get("best_val_loss"), m["run_id"]
        loader.next_sample = m["next_sample"]
        if m["seq_len"] != seq_len:
            raise CheckpointError(f"checkpoint '{resume_url}' was trained with seq_len {m['seq_len']}, the config says "
                                  f"{seq_len}: the token stream cannot continue; start a new run with resume={resume_url}")
        if ckpt.rng and len(ckpt.rng) == world.world_size:
            set_rng_state(ckpt.rng[world.rank])
        else:  # another world size: fresh streams per rank; only dropout draws from them
            torch.manual_seed(t.seed + 1000 * step + world.rank)
    else:
        torch.manual_seed(t.seed + world.rank)
    del ckpt

    accum = loader.accum_steps
    flops_per_step = raw_model.flops_per_token(seq_len) * t.batch_tokens
    peak = precision.peak_flops(device, prec) if world.is_main else None
    say(f"world: {world.describe()}, backend {backend or 'none'}"
        + (f", strategy {cfg.distributed.strategy}, master {world.master_addr}:{world.master_port}" if world.distributed else ""))
    say(f"device: {device}, precision {prec}, compile {t.compile}, deterministic {deterministic}"
        + (f", MFU against {peak / 1e12:.3g} TFLOP/s" if peak else ""))
    say(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, {cfg.model.n_embd} wide, "
        f"vocab {cfg.model.vocab_size} ({meta['tokenizer']['name']})")
    say(f"data: {train_split.tokens:,} train / {val_split.tokens:,} val tokens in '{cfg.data.dir}'; batch {t.batch_tokens:,} "
        f"tokens = {t.micro_batch} seq x {seq_len} x {world.world_size} rank(s) x {accum} accumulation step(s)")
    say(f"run: {cfg.run_dir} (id {run_id}); {note}")

    if step >= t.max_steps:
        say(f"run already complete at step {step}/{t.max_steps}: nothing to do")
        return 0

    log = None
    if world.is_main:
        store.write_text("config.yaml", dump(cfg))
        log = RunLog(store, resume_step=step, config=cfg)
        log.event("resume" if step else "start", step=step, world_size=world.world_size,
                  slurm_job=os.environ.get("SLURM_JOB_ID"), restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    say("config:\n" + dump(cfg).rstrip())

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for x, y in data.eval_batches(val_split, t.eval_batches, t.micro_batch, world.rank, world.world_size):
                with precision.autocast(prec, device):
                    _, loss = raw_model(x.to(device), y.to(device))
                total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=device)
        model.train()
        loss_sum, count = distributed.all_reduce_sum(total.tolist(), device)
        return loss_sum / count

    def sample_text() -> str:
        from gpt_train.sampling import sample
        gen = torch.Generator(device=device).manual_seed(t.seed + step)  # leaves the training RNG untouched
        prompt = tokenizer.encode(t.sample_prompt) or [tokenizer.eot]
        ids = sample(raw_model, prompt, t.sample_tokens, temperature=0.8, top_k=200, generator=gen, eot=tokenizer.eot)[0]
        return t.sample_prompt + tokenizer.decode(ids)

    def save(val_loss: float | None, final: bool = False) -> None:
        rngs = distributed.all_gather_object(rng_state())
        # Every rank takes part: under FSDP these gather the shards, into rank 0's host memory.
        weights, opt = distributed.model_state(raw_model), distributed.optimizer_state(raw_model, optimizer)
        if not world.is_main:
            return
        meta_out = {
            "step": step, "tokens": tokens, "next_sample": loader.next_sample, "seq_len": seq_len,
            "val_loss": val_loss, "best_val_loss": best_val, "final": final, "run_id": run_id,
            "world_size": world.world_size, "config": to_dict(cfg), "tokenizer": meta["tokenizer"],
            "version": gpt_train.__version__, "git_commit": git_commit(), "time": time.time(),
        }
        opt_state = {"optimizer": opt, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        blocked = ckpts.save(step, weights, opt_state, rngs, meta_out)
        log.flush()
        say(f"checkpoint: step {step} snapshot taken, training blocked {blocked * 1000:.0f} ms")

    deadline = slurm_end_time()
    preempt = Preemption(cfg.preemption.signals, deadline, cfg.preemption.deadline_margin_s)
    if deadline:
        say(f"deadline: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(deadline))}; the run checkpoints and "
            f"exits {cfg.preemption.deadline_margin_s} s before it")

    model.train()
    val_loss = None
    t_last, steps_since = time.perf_counter(), 0
    step_seconds, t_step = 0.0, time.perf_counter()
    while step < t.max_steps:
        lr = optim.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        micro = loader.next_batch()
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step of the accumulation.
            sync = i == len(micro) - 1 or not world.distributed
            with contextlib.nullcontext() if sync else model.no_sync():
                with precision.autocast(prec, device):
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += t.batch_tokens
        steps_since += 1
        last = step == t.max_steps

        if step % t.log_interval == 0 or last:
            train_loss = distributed.all_reduce_mean(loss_sum.item() / accum, device)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"loss is {train_loss} at step {step}: lower optim.lr or use bf16/fp32")
            dt = (time.perf_counter() - t_last) / steps_since
            t_last, steps_since = time.perf_counter(), 0
            norm = grad_norm.item() if grad_norm is not None else float("nan")
            tok_s = t.batch_tokens / dt
            mfu = flops_per_step / dt / peak if peak else None
            say(f"step {step:>6}/{t.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                f"{dt * 1000:.0f} ms/step | {tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else ""), flush=True)
            if log:
                log.metric(step=step, loss=train_loss, lr=lr, grad_norm=norm, tokens=tokens, step_ms=dt * 1000,
                           tokens_per_s=tok_s, mfu=mfu, epoch=loader.epoch, time=time.time())

        val_loss = None
        if (t.eval_interval and step % t.eval_interval == 0) or last:
            val_loss = evaluate()
            best_val = val_loss if best_val is None else min(best_val, val_loss)
            say(f"step {step:>6}/{t.max_steps} | val loss {val_loss:.4f} | best {best_val:.4f}", flush=True)
            if log:
                log.metric(step=step, val_loss=val_loss, tokens=tokens, time=time.time())

        if t.sample_tokens and ((t.sample_interval and step % t.sample_interval == 0) or last):
            with distributed.gathered(raw_model):  # FSDP: every rank gathers the weights so rank 0 can run alone
                text = sample_text() if world.is_main else None
            if world.is_main:
                say(f"sample at step {step}:\n{text}\n", flush=True)
                log.sample(step, text)

        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last:
            save(val_loss, final=last)

        now = time.perf_counter()
        step_seconds, t_step = max(step_seconds * 0.9, now - t_step), now
        reason = preempt.reason(step_seconds)
        if not last and distributed.any_rank(reason is not None, device):
            say(f"preemption: {reason or 'a peer rank was signalled'} at step {step}: checkpointing, then exiting "
                f"with {REQUEUE_EXIT} to be requeued", flush=True)
            if not (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                save(val_loss)
            if world.is_main:
                landed = ckpts.wait()
                log.event("preempted", step=step, cause=reason or "peer", checkpoint_landed=landed)
                log.close()
            return REQUEUE_EXIT

    if world.is_main:
        landed = ckpts.wait()
        log.event("finish", step=step, tokens=tokens, val_loss=val_loss)
        log.close()
        say(f"done: step {step}, val loss {val_loss:.4f}, checkpoint "
            + (f"{cfg.run_dir}/checkpoints/{checkpoint.step_name(step)}" if landed else f"FAILED ({ckpts.last_error})"))
        if not landed:
            return 1
    return 0


def _resume_point(cfg: Config, ckpts: checkpoint.Checkpointer) -> tuple[checkpoint.Checkpoint | None, str | None, str]:
    """(verified checkpoint to resume, URL of a checkpoint to take weights from, what to print)."""
    mode = cfg.checkpoint.resume
    valid = ckpts.valid_steps()
    if mode == "none":
        if valid and not cfg.checkpoint.overwrite:
            raise CheckpointError(f"run_dir '{cfg.run_dir}' already has checkpoints (newest step {valid[-1]}) and "
                                  "checkpoint.resume=none: pick another run_dir, resume=auto, or overwrite=true")
        if valid:
            for name in ("checkpoints", "metrics.jsonl", "events.jsonl"):
                ckpts.store.remove(name)
        return None, None, "starting fresh" + (" (old checkpoints removed: overwrite=true)" if valid else "")
    if mode == "best":
        url = ckpts.best_url()
        if url is None:
            raise CheckpointError(f"checkpoint.resume=best but '{cfg.run_dir}' has no checkpoint with a val loss")
        found = checkpoint.load(url)
        _drop_newer(ckpts, found.step)
        return found, None, f"resuming from the best checkpoint {url} (step {found.step})"
    found = ckpts.load_newest()
    if found:
        _drop_newer(ckpts, found.step)
        return found, None, f"resuming from {found.url} (step {found.step})"
    if mode == "auto":
        return None, None, "no checkpoint found: starting fresh"
    return None, mode, f"no checkpoint of its own: starting from the weights of {mode}"


def _drop_newer(ckpts: checkpoint.Checkpointer, step: int) -> None:
    """Folders newer than the resume point did not verify; they would confuse retention and the next resume."""
    for s, _ in checkpoint.list_steps(ckpts.store):
        if s > step:
            print(f"checkpoint: removing {checkpoint.step_name(s)}: newer than the resume point and not loadable")
            ckpts.store.remove(f"checkpoints/{checkpoint.step_name(s)}/{checkpoint.MANIFEST}")
            ckpts.store.remove(f"checkpoints/{checkpoint.step_name(s)}")
