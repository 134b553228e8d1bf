"""`python launch/submit.py [options] CONFIG [key=value ...]` (also `gpt-train-submit`): run `gpt-train train`
on SLURM (through submitit), on this machine with torchrun, or in the Docker image. See docs/launching.md.

    gpt-train-submit --nodes 2 --gpus 4 --partition gpu --time 2-00:00:00 gpt2-large optim.lr=2e-4
    gpt-train-submit --nodes 2 --gpus 4 gpt2-large --dry-run          # the sbatch script, nothing submitted
    gpt-train-submit --backend local --gpus 8 gpt2                    # torchrun on this machine
    gpt-train-submit --backend local --nodes 2 --node-rank 0 --master-addr 10.0.0.1 --gpus 8 gpt2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

if __package__ in (None, ""):  # `python launch/submit.py`: make `launch` and `gpt_train` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_train import protocol  # noqa: E402
from gpt_train.errors import UserError  # noqa: E402
from launch import local  # noqa: E402
from launch import spec as specs
from launch.spec import credential_names, quote  # noqa: E402

PROG = "gpt-train-submit"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything after CONFIG reaches `gpt-train train` unchanged (quoted).")
    p.add_argument("config", metavar="CONFIG", help="a config file, or a preset name (gpt2-large); config/NAME.yaml "
                   "is the preset when no such file exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    g = p.add_argument_group("what and where")
    g.add_argument("--backend", choices=("slurm", "local", "docker"),
                   help="default: slurm where sbatch is on PATH, else local")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="GPUs per node, one rank each; where there is no GPU, CPU ranks per node (gloo)")
    dev = g.add_mutually_exclusive_group()
    dev.add_argument("--cpu", dest="cpu", action="store_true", default=None,
                     help="the ranks are CPU processes: request no GPU (default on SLURM: ask sinfo for GPU gres)")
    dev.add_argument("--gpu", dest="cpu", action="store_false", help="request GPUs even if sinfo shows none")
    g.add_argument("--run-dir", default="", metavar="URL", help="run directory, any fsspec URL (default: the "
                   "config's run_dir; with --job-name, that name in the same parent); fixed at submission")
    g.add_argument("--job-name", default="", help="default: the config's name")
    g.add_argument("--max-restarts", type=int, default=None,
                   help="SLURM: requeues allowed, counted by SLURM_RESTART_COUNT (also submitit's max_num_timeout; "
                        "default 10); local: restarts after a crash or a hang (default 10; the trainer stops at "
                        "fault.in_job_restarts)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the exact job script or commands and their environment; submit nothing")
    g.add_argument("--follow", action="store_true", help="SLURM: stream rank 0's log until the job ends")
    s = p.add_argument_group("SLURM")
    s.add_argument("--partition", "-p", default="")
    s.add_argument("--account", "-A", default="")
    s.add_argument("--qos", default="")
    s.add_argument("--time", "-t", default="24:00:00", help="time limit per run (MM, HH:MM:SS, D-HH:MM:SS)")
    s.add_argument("--constraint", "-C", default="")
    s.add_argument("--mem", default="", help="memory per node, e.g. 200G (sbatch --mem)")
    s.add_argument("--exclusive", action="store_true")
    s.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per rank (default: the cluster's)")
    s.add_argument("--signal-delay", type=int, default=180, metavar="S",
                   help="USR2 to the ranks S seconds before the time limit (default 180)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="--KEY[=VALUE]",
                   help="any other sbatch option, long form; repeat for more (e.g. --sbatch-arg=--gres=gpu:a100:8)")
    s.add_argument("--log-dir", default="", help="submitit folder (default logs/JOB_NAME): JOBID/JOBID_0_log.out")
    s.add_argument("--container-image", default="", metavar="IMAGE", help="pyxis: srun --container-image=IMAGE")
    s.add_argument("--container-mounts", default="", metavar="SRC:DST[,...]",
                   help="pyxis --container-mounts / apptainer --bind (default: cwd, logs, a local run_dir)")
    s.add_argument("--apptainer", default="", metavar="IMAGE", help="apptainer exec --nv IMAGE python3 ...")
    s.add_argument("--container-python", default="python3", help="python inside the container (default python3)")
    n = p.add_argument_group("NCCL (exported to every rank)")
    ib = n.add_mutually_exclusive_group()
    ib.add_argument("--ib", dest="ib", action="store_true", default=None, help="NCCL_IB_DISABLE=0")
    ib.add_argument("--no-ib", dest="ib", action="store_false", help="NCCL_IB_DISABLE=1 (TCP sockets only)")
    n.add_argument("--socket-ifname", default="", metavar="IF", help="NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME)")
    n.add_argument("--nccl-debug", default="", choices=("", "VERSION", "WARN", "INFO", "TRACE"), help="NCCL_DEBUG")
    loc = p.add_argument_group("local and docker")
    loc.add_argument("--node-rank", type=int, default=0, help="this node's rank in a multi-node run (default 0)")
    loc.add_argument("--master-addr", default="", metavar="HOST", help="node 0's address (multi-node)")
    loc.add_argument("--master-port", type=int, default=29500)
    loc.add_argument("--image", default="gpt-train:latest", help="docker image (make docker-build)")
    return p


def default_backend() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    backend = args.backend or default_backend()
    try:
        spec = specs.build(args.config, args.overrides, nodes=args.nodes, ranks_per_node=args.gpus,
                           job_name=args.job_name, run_dir=args.run_dir,
                           env=specs.nccl_env(args.ib, args.socket_ifname, args.nccl_debug))
        if backend == "slurm":
            return submit_slurm(args, spec)
        return run_local(args, spec, backend)
    except (UserError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return protocol.EXIT_USER_ERROR


def _header(args, spec: specs.JobSpec, backend: str, detail: str) -> list[str]:
    preset = "" if os.path.isabs(spec.config) else f" (preset {spec.config_path})"
    return [
        f"# {PROG}: backend {backend}, {spec.nodes} node(s) x {spec.ranks_per_node} rank(s) = {spec.world_size} "
        f"rank(s){detail}" + (" -- dry run, nothing started" if args.dry_run else ""),
        f"# config: {spec.config}{preset}",
        f"# run_dir: {spec.run_dir} (fixed at submission: every restart resumes it)",
    ]


def submit_slurm(args, spec: specs.JobSpec) -> int:
    from launch import slurm

    gpus = (not args.cpu) if args.cpu is not None else slurm.partition_has_gpus(args.partition)
    detected = "" if args.cpu is not None else (" (sinfo: no GPU gres)" if gpus is False else
                                                 " (sinfo: GPU gres)" if gpus else " (sinfo unavailable: GPUs assumed)")
    gpus = gpus is not False
    res = slurm.Resources(
        partition=args.partition, account=args.account, qos=args.qos, time_min=slurm.parse_time(args.time),
        constraint=args.constraint, mem=args.mem, exclusive=args.exclusive, cpus_per_task=args.cpus_per_task,
        gpus=gpus, signal_delay_s=args.signal_delay, sbatch_args=args.sbatch_arg,
        max_restarts=10 if args.max_restarts is None else args.max_restarts, log_dir=args.log_dir,
        container_image=args.container_image, container_mounts=args.container_mounts,
        apptainer=args.apptainer, container_python=args.container_python)
    if args.container_image and args.apptainer:
        raise UserError("give --container-image (pyxis) or --apptainer, not both")
    kind = (f", one task per GPU ({spec.ranks_per_node} GPU(s) per node)" if gpus
            else ", one task per CPU rank (gloo), no GPU requested") + detected
    head = _header(args, spec, "slurm (submitit)", kind)
    if args.dry_run:
        inner = " ".join(["RANK=$SLURM_PROCID", "LOCAL_RANK=$SLURM_LOCALID", "WORLD_SIZE=$SLURM_NTASKS",
                          "MASTER_ADDR=$MASTER_ADDR", "MASTER_PORT=$MASTER_PORT"])
        print("\n".join(head + [
            f"# logs: {slurm.folder(spec, res)}/%j_0_log.out (rank 0; %j_<rank>_log.out, .err for each rank)",
            "# ---- sbatch script (generated by submitit; sbatch runs it) ----",
            slurm.script_text(spec, res).rstrip(),
            "# ---- each task: launch.slurm.Trainer, in-process; the same as ----",
            f"{inner} {slurm.python_command(spec, res)} {quote(spec.train_command('python')[1:])}",
            "# ---- environment of the ranks ----",
            *([f"{k}={v}" for k, v in spec.env.items()] or ["# (no NCCL setting given)"]),
            "# credentials passed by name (sbatch --export=ALL; values not shown): "
            + (" ".join(credential_names()) or "(none set)"),
        ]))
        return 0
    job = slurm.submit(spec, res)
    out, err = slurm.log_paths(job.job_id, spec, res)
    print("\n".join(head + [f"submitted job {job.job_id}", f"log (rank 0): {out}", f"errors (rank 0): {err}",
                            f"all ranks: {out.parent}/"]), flush=True)
    if not args.follow:
        return 0
    state = slurm.follow(job.job_id, out, err)
    print(f"{PROG}: job {job.job_id} ended {state}", flush=True)
    return 0 if state == "COMPLETED" else 1


def run_local(args, spec: specs.JobSpec, backend: str) -> int:
    if spec.nodes > 1 and not args.master_addr:
        raise UserError(f"--nodes {spec.nodes} without SLURM needs --master-addr (node 0's address) and --node-rank")
    if not 0 <= args.node_rank < spec.nodes:
        raise UserError(f"--node-rank {args.node_rank} is not in 0..{spec.nodes - 1}")
    node = local.Node(node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)
    if backend == "docker":
        gpus = not args.cpu if args.cpu is not None else shutil.which("nvidia-smi") is not None
        build = lambda n: local.docker_command(spec, n, args.image, gpus)  # noqa: E731
    else:
        build = lambda n: local.train_command(spec, n, local.python())  # noqa: E731
    commands = {r: build(local.Node(r, node.master_addr, node.master_port)) for r in range(spec.nodes)}
    text = "\n".join(_header(args, spec, backend, "") + [local.describe(spec, node, commands)])
    print(text, flush=True)
    if args.dry_run:
        return 0
    from gpt_train import supervise

    argv = commands[node.node_rank]
    if backend == "docker":  # the image's entrypoint restarts its ranks itself
        rc, _ = supervise.run_once(argv, {**os.environ, **spec.env})
    else:
        rc = supervise.supervise(argv, spec.ranks_per_node, {**os.environ, **spec.env},
                                 protocol.MAX_IN_JOB if args.max_restarts is None else args.max_restarts,
                                 say=lambda m: print(m, flush=True))
    if rc == protocol.EXIT_REQUEUE:
        print(f"{PROG}: the run checkpointed and stopped (exit {rc}); the same command resumes it", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
