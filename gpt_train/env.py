"""`gpt-train env [CONFIG] [key=value ...] [--json]`: what a run would see, before GPU time is spent.

Software versions (torch, CUDA, cuDNN, NCCL), devices with their memory and bf16 support, the world the
launcher describes (ranks, nodes, master address and whether the other nodes can reach it), the
communication variables (from the environment and those the config would set), and whether run_dir
is reachable and writable and data.dir is prepared. It exits 1 when a run with this config would fail
on one of these, so a job script can run it as a preflight step:

    srun --ntasks-per-node=1 gpt-train env configs/gpt2.yaml run_dir=s3://bucket/run && srun gpt-train train ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys

import torch
import torch.distributed as dist

import gpt_train
from gpt_train import distributed, precision
from gpt_train.config import Config, load_config, validate
from gpt_train.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="default", help="config file or preset name (default: the small CPU preset)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. run_dir=s3://bucket/run distributed.ib=off")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    report = collect(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(render(report))
    return 1 if report["problems"] else 0


# -- what is collected ---------------------------------------------------------------------------

def _software() -> dict:
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # a build without NCCL
            nccl = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpt_train": gpt_train.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "backends": {"gloo": dist.is_available() and dist.is_gloo_available(),
                     "nccl": dist.is_available() and dist.is_nccl_available()},
    }


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or "unknown"


def _devices(world: distributed.World) -> dict:
    mem = _meminfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "host": socket.gethostname(),
        "cpu": {"name": _cpu_name(), "cores": cores, "memory_gib": round(mem.get("MemTotal", 0), 1),
                "available_gib": round(mem.get("MemAvailable", 0), 1), "bf16": precision.cpu_has_bf16()},
        "cuda": [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mps": torch.backends.mps.is_available(),
    }
    if torch.cuda.is_available():
        try:
            mine = distributed.cuda_index(world, torch.cuda.device_count())  # the rule the ranks follow
        except UserError:
            mine = None  # too few GPUs for this rank: the report's problems say so
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpu = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                   "memory_gib": round(p.total_memory / 2**30, 1), "bf16": p.major >= 8}
            if i == mine:  # only this rank's device: a context on every GPU from every rank costs memory
                free, _ = torch.cuda.mem_get_info(i)
                gpu["free_gib"] = round(free / 2**30, 1)
            out["cuda"].append(gpu)
    return out


def _storage(cfg: Config) -> tuple[dict, list[str]]:
    from gpt_train import data, rundir
    from gpt_train.storage import Store

    problems = []
    out: dict = {"run_dir": {"url": cfg.run_dir}}
    try:
        store = Store(cfg.run_dir)
        existed = store.exists()
        store.check_writable()
        if store.local and not existed:  # leave no empty directory behind
            try:
                os.rmdir(store.root)
            except OSError:
                pass
        steps = rundir.manifested_steps(store) if existed else []
        out["run_dir"].update(writable=True, checkpoints=len(steps), newest_step=steps[-1] if steps else None)
    except Exception as e:  # any storage library's error: reported, not raised
        out["run_dir"].update(writable=False, error=str(e))
        problems.append(f"run_dir '{cfg.run_dir}' is not writable: {e}")
    out["data"] = []
    for source in cfg.data.mixture():
        found: dict = {"dir": source.dir, "weight": source.weight}
        try:
            meta = data.read_meta(source.dir, source.format)
            found.update(ok=True, tokenizer=meta["tokenizer"]["name"],
                         tokens={name: split.get("tokens") for name, split in meta["splits"].items()})
        except UserError as e:
            found.update(ok=False, error=str(e))
            problems.append(str(e))
        out["data"].append(found)
    return out, problems


def collect(cfg: Config, environ: dict[str, str] | None = None) -> dict:
    environ = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    world = distributed.detect_world(environ)
    report: dict = {"config": {"run_dir": cfg.run_dir, "strategy": cfg.distributed.strategy,
                               "backend": cfg.distributed.backend, "device": cfg.train.device,
                               "precision": cfg.train.precision}}
    report["software"] = _software()
    report["devices"] = _devices(world)

    run: dict = {}
    try:
        device = distributed.pick_device(cfg.train.device, world)
        prec = precision.choose(cfg.train.precision, device)
        run.update(device=str(device), precision=prec)
        problem = precision.check(prec, device)
        if problem:
            problems.append(problem)
        backend = cfg.distributed.backend
        run["backend"] = None if not world.distributed else ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        if run["backend"] and not report["software"]["backends"].get(run["backend"]):
            problems.append(f"backend {run['backend']} is not available in this torch build")
    except UserError as e:
        run["error"] = str(e)
        problems.append(str(e))
    try:
        validate(cfg, world.world_size)
    except UserError as e:
        problems.append(str(e))
    report["run"] = run

    addr, port, source = distributed.rendezvous_address(world, cfg.distributed)
    launcher = {"launcher": world.launcher, "rank": world.rank, "local_rank": world.local_rank,
                "world_size": world.world_size, "local_world_size": world.local_world_size, "nodes": world.nodes,
                "slurm_job": environ.get("SLURM_JOB_ID"), "slurm_nodelist": environ.get("SLURM_JOB_NODELIST")}
    if world.distributed:
        launcher.update(master_addr=addr, master_port=port, master_from=source)
        problem = distributed.check_master(world, addr, port)
        if problem:
            problems.append(problem)
        else:
            try:
                socket.getaddrinfo(addr, port)
            except OSError as e:
                problems.append(f"master address '{addr}' does not resolve on this node ({e.strerror or e})")
    report["launcher"] = launcher

    from_env = distributed.comm_environment(environ)
    from_config = distributed.env_settings(cfg.distributed)
    report["communication"] = {"environment": from_env, "config_sets": from_config,
                               "overridden": {k: from_env[k] for k in from_config if k in from_env and from_env[k] != from_config[k]}}

    storage, storage_problems = _storage(cfg)
    report.update(storage)
    problems += storage_problems
    report["problems"] = problems
    return report


# -- text ------------------------------------------------------------------------------------------

def render(r: dict) -> str:
    s, d, run, lw, comm = r["software"], r["devices"], r["run"], r["launcher"], r["communication"]
    lines = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<10} {text}")

    yes = lambda b: "yes" if b else "no"
    row("software", f"gpt-train {s['gpt_train']}, python {s['python']}, torch {s['torch']}, CUDA {s['cuda'] or 'none'}, "
                    f"cuDNN {s['cudnn'] or 'none'}, NCCL {s['nccl'] or 'none'}; "
                    f"backends gloo {yes(s['backends']['gloo'])}, nccl {yes(s['backends']['nccl'])}")
    c = d["cpu"]
    row("host", f"{d['host']}: {c['name']}, {c['cores']} cores, {c['memory_gib']} GiB memory "
                f"({c['available_gib']} available), fast bf16 {yes(c['bf16'])}")
    if d["cuda"]:
        for g in d["cuda"]:
            free = f", {g['free_gib']} GiB free" if "free_gib" in g else ""
            row("gpu", f"cuda:{g['index']} {g['name']} (sm {g['capability']}), {g['memory_gib']} GiB{free}, bf16 {yes(g['bf16'])}")
    else:
        row("gpu", "no CUDA device visible" + (f" (CUDA_VISIBLE_DEVICES={d['cuda_visible_devices']})"
                                                if d["cuda_visible_devices"] is not None else ""))
    if "error" in run:
        row("run", run["error"])
    else:
        row("run", f"device {run['device']}, precision {run['precision']}, strategy {r['config']['strategy']}, "
                   f"backend {run['backend'] or 'none (one process)'}")
    if lw["world_size"] > 1:
        row("launcher", f"{lw['launcher']}: rank {lw['rank']}/{lw['world_size']} (local {lw['local_rank']}/"
                        f"{lw['local_world_size']}) on {lw['nodes']} node(s), master {lw['master_addr']}:"
                        f"{lw['master_port']} ({lw['master_from']})")
    else:
        row("launcher", "one process (no RANK/WORLD_SIZE from torchrun, no srun task among several)")
    if lw["slurm_job"]:
        row("slurm", f"job {lw['slurm_job']}, nodes {lw['slurm_nodelist']}")
    env = comm["environment"]
    row("comm env", ", ".join(f"{k}={v}" for k, v in env.items()) or "no NCCL_/GLOO_/TORCH_NCCL_/MASTER_ variables set")
    if comm["config_sets"]:
        row("config", "sets " + ", ".join(f"{k}={v}" + (f" (environment has {comm['overridden'][k]}; the config wins)"
                                                         if k in comm["overridden"] else "")
                                          for k, v in comm["config_sets"].items()))
    rd = r["run_dir"]
    if rd.get("writable"):
        ck = (f"{rd['checkpoints']} checkpoint(s), newest step {rd['newest_step']}: a run resumes there"
              if rd["checkpoints"] else "no checkpoints: a run starts fresh")
        row("run_dir", f"{rd['url']}: writable; {ck}")
    else:
        row("run_dir", f"{rd['url']}: NOT writable")
    for dd in r["data"]:
        weight = f" (weight {dd['weight']:g})" if len(r["data"]) > 1 else ""
        if dd.get("ok"):
            row("data", f"{dd['dir']}{weight}: " + ", ".join(f"{k} {v:,} tokens" for k, v in dd["tokens"].items()
                                                             if v is not None) + f" ({dd['tokenizer']})")
        else:
            row("data", f"{dd['dir']}{weight}: not usable")
    if r["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("problems: none")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
