"""`python launch/submit.py [options] CONFIG [key=value ...]` (also `gpt-train-submit`): run `gpt-train train`
on SLURM (through submitit), on this machine with torchrun, or in the Docker image. See docs/launching.md.

    gpt-train-submit --nodes 2 --gpus 4 --partition gpu --time 2-00:00:00 gpt2-large optim.lr=2e-4
    gpt-train-submit --nodes 2 --gpus 4 gpt2-large --dry-run          # the sbatch script, nothing submitted
    gpt-train-submit --backend local --gpus 8 gpt2                    # torchrun on this machine
    gpt-train-submit --backend local --nodes 2 --node-rank 0 --master-addr 10.0.0.1 --gpus 8 gpt2
    gpt-train-submit gpt2 --sweep optim.lr=1e-4,3e-4 --sweep model.n_layer=6,12 --max-parallel 2   # a job array
    gpt-train-submit gpt2 --after 1234 --then "gpt-train eval {run_dir} --task val"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # `python launch/submit.py`: make `launch` and `gpt_train` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_train import protocol  # noqa: E402
from gpt_train.errors import UserError  # noqa: E402
from launch import chain, local, snapshot, sweep  # noqa: E402
from launch import spec as specs
from launch.spec import JobSpec, credential_names, quote  # noqa: E402
from launch.sweep import Element  # noqa: E402

if TYPE_CHECKING:  # submitit is imported only where a job goes to SLURM
    from launch import slurm

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
    g.add_argument("--follow", action="store_true", help="SLURM: stream rank 0's log until the job ends (a sweep: "
                   "wait for every element and say how each ended)")
    w = p.add_argument_group("sweeps and chains")
    w.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every combination of the values (repeat for more keys): one SLURM job array, or one "
                        "run after another locally; each in RUN_DIR/<key=value,...>")
    w.add_argument("--max-parallel", type=int, default=0, metavar="K",
                   help="SLURM sweep: at most K elements at a time (default: all)")
    w.add_argument("--after", action="append", default=[], metavar="JOBID[:ok|any]",
                   help="SLURM: start once job JOBID succeeded (:ok, the default) or ended (:any); repeatable")
    w.add_argument("--then", default="", metavar="COMMAND",
                   help="once the run succeeded, run COMMAND ({run_dir}: the run directory, quoted), e.g. "
                        "\"gpt-train eval {run_dir} --task val\"; SLURM: a one-task job after the training job")
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
    s.add_argument("--log-dir", default="", help="logs and the code snapshot (default logs/JOB_NAME): SLURM "
                   "JOBID/JOBID_0_log.out, local local-TIME.log")
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
        base, elements = plan(args)
        if backend == "slurm":
            return submit_slurm(args, base, elements)
        return run_local(args, base, elements, backend)
    except (UserError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return protocol.EXIT_USER_ERROR


def plan(args) -> tuple[JobSpec, list[Element]]:
    """The job, validated; with --sweep, also each element's (the base job's run_dir is the sweep's folder)."""
    if args.max_parallel and not args.sweep:
        raise UserError("--max-parallel is for a sweep (--sweep KEY=V1,V2,...)")
    if args.max_parallel < 0:
        raise UserError(f"--max-parallel {args.max_parallel}: give a number of elements, at least 1")

    def build(overrides: list[str], run_dir: str) -> JobSpec:
        return specs.build(args.config, overrides, nodes=args.nodes, ranks_per_node=args.gpus,
                           job_name=args.job_name, run_dir=run_dir,
                           env=specs.nccl_env(args.ib, args.socket_ifname, args.nccl_debug))

    base = build(args.overrides, args.run_dir)
    return base, (sweep.expand(args.sweep, base, args.overrides, build) if args.sweep else [])


def _header(args, spec: JobSpec, backend: str, detail: str, elements: list[Element]) -> list[str]:
    preset = "" if os.path.isabs(spec.config) else f" (preset {spec.config_path})"
    where = (f"# sweep: {len(elements)} element(s) under {spec.run_dir}, each in its own run directory (fixed at "
             "submission: every restart resumes it)" if elements else
             f"# run_dir: {spec.run_dir} (fixed at submission: every restart resumes it)")
    return [
        f"# {PROG}: backend {backend}, {spec.nodes} node(s) x {spec.ranks_per_node} rank(s) = {spec.world_size} "
        f"rank(s){detail}" + (" -- dry run, nothing started" if args.dry_run else ""),
        f"# config: {spec.config}{preset}",
        where,
        *(sweep.table(elements) if elements else []),
    ]


def _follow_lines(run_dir: str, first: str) -> list[str]:
    """How to watch it (gpt_train/cli.py): the runs under the folder, and a run's log as it grows."""
    return ["follow it:", f"  gpt-train runs {shlex.quote(run_dir)}", f"  gpt-train logs {shlex.quote(first)} -f"]


def _print_slurm_dry_run(base: JobSpec, res: slurm.Resources, runs: list[JobSpec], elements: list[Element],
                         head: list[str], code: snapshot.Snapshot, then: list[str]) -> None:
    """What submit_slurm would submit: the sbatch script, each task's command, the ranks' environment and the
    follow-up job, without submitting anything."""
    from launch import slurm

    inner = " ".join(["RANK=$SLURM_PROCID", "LOCAL_RANK=$SLURM_LOCALID", "WORLD_SIZE=$SLURM_NTASKS",
                      "MASTER_ADDR=$MASTER_ADDR", "MASTER_PORT=$MASTER_PORT"])
    tasks = [f"{inner} {slurm.python_command(s, res)} {quote(s.train_command('python')[1:])}" for s in runs]
    if elements:
        tasks = [line for i, t in enumerate(tasks) for line in (f"# element {i}", t)]
    ids = "%A_%a" if res.array else "%j"
    print("\n".join(head + [
        f"# code: {code.describe()} (copied at submission; the ranks import it first)",
        *([f"# after: --dependency={res.dependency}"] if res.dependency else []),
        f"# logs: {slurm.folder(base, res).replace('%j', ids)}/{ids}_0_log.out (rank 0; {ids}_<rank>_log.out, "
        ".err for each rank)",
        "# ---- sbatch script (generated by submitit; sbatch runs it) ----",
        slurm.script_text(base, res).rstrip(),
        "# ---- each task: launch.slurm.Trainer, in-process; the same as ----",
        *tasks,
        "# ---- environment of the ranks ----",
        *([f"{k}={v}" for k, v in base.env.items()] or ["# (no NCCL setting given)"]),
        "# set by the script's setup lines: GPT_TRAIN_SLURM_JOB GPT_TRAIN_LOG PYTHONPATH PYTHONSAFEPATH "
        f"{snapshot.COMMIT_VAR} {snapshot.DIR_VAR}",
        "# credentials passed by name (sbatch --export=ALL; values not shown): "
        + (" ".join(credential_names()) or "(none set)"),
        *([f"# ---- follow-up job (--then; sbatch {slurm.then_path(base, res, 'JOBID')}, JOBID: the "
           "training job's) ----", slurm.then_script(then, "JOBID", base, res).rstrip()] if then else []),
    ]))


def submit_slurm(args, base: JobSpec, elements: list[Element]) -> int:
    from submitit.core.utils import FailedJobError

    from launch import slurm

    gpus = (not args.cpu) if args.cpu is not None else slurm.partition_has_gpus(args.partition)
    detected = "" if args.cpu is not None else (" (sinfo: no GPU gres)" if gpus is False else
                                                 " (sinfo: GPU gres)" if gpus else " (sinfo unavailable: GPUs assumed)")
    gpus = gpus is not False
    runs = [e.spec for e in elements] or [base]
    code = snapshot.plan(specs.log_dir(base, args.log_dir))
    res = slurm.Resources(
        partition=args.partition, account=args.account, qos=args.qos, time_min=slurm.parse_time(args.time),
        constraint=args.constraint, mem=args.mem, exclusive=args.exclusive, cpus_per_task=args.cpus_per_task,
        gpus=gpus, signal_delay_s=args.signal_delay, sbatch_args=args.sbatch_arg,
        max_restarts=10 if args.max_restarts is None else args.max_restarts, log_dir=args.log_dir,
        container_image=args.container_image, container_mounts=args.container_mounts,
        apptainer=args.apptainer, container_python=args.container_python,
        array=len(runs) if len(runs) > 1 else 0, max_parallel=args.max_parallel,
        dependency=chain.dependency(args.after), code=code)
    if args.container_image and args.apptainer:
        raise UserError("give --container-image (pyxis) or --apptainer, not both")
    then = [chain.fill(args.then, s.run_dir) for s in runs] if args.then else []
    kind = (f", one task per GPU ({base.ranks_per_node} GPU(s) per node)" if gpus
            else ", one task per CPU rank (gloo), no GPU requested") + detected
    head = _header(args, base, "slurm (submitit)", kind, elements)
    if args.dry_run:
        _print_slurm_dry_run(base, res, runs, elements, head, code, then)
        return 0
    for after in args.after:  # SLURM takes a dependency on a job it does not know as met, and starts at once
        if slurm.job_state(after.split(":")[0]) is None:
            raise UserError(f"--after {after}: squeue and sacct know no job {after.split(':')[0]}")
    snapshot.take(code)
    try:
        jobs = slurm.submit_array(runs, res) if res.array else [slurm.submit(base, res)]
    except FailedJobError as e:  # sbatch's complaint (a partition, an account): one line, no traceback
        raise UserError("sbatch refused the job: " + " ".join(str(e).split())) from None
    lines = head + [f"code: {code.describe()}"]
    if res.array:
        lines.append(f"submitted job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} element(s), at most "
                     f"{res.max_parallel or len(jobs)} at a time")
        for e, job in zip(elements, jobs):
            out, _ = slurm.log_paths(job.job_id, base, res)
            lines.append(f"element {e.index}: job {job.job_id}, run_dir {e.spec.run_dir}, log {out}")
    else:
        out, err = slurm.log_paths(jobs[0].job_id, base, res)
        lines += [f"submitted job {jobs[0].job_id}", f"log (rank 0): {out}", f"errors (rank 0): {err}",
                  f"all ranks: {out.parent}/"]
    print("\n".join(lines), flush=True)
    if then:
        then_id, logs = slurm.submit_then(then, jobs[0].job_id.split("_")[0], base, res)
        when = "for each element, once it succeeded" if len(then) > 1 else "once the run succeeded"
        print(f"then: job {then_id} runs {args.then!r} {when}; log{'s' if len(logs) > 1 else ''}: " + " ".join(logs),
              flush=True)
    print("\n".join(_follow_lines(base.run_dir, runs[0].run_dir)), flush=True)
    if not args.follow:
        return 0
    if res.array:
        states = slurm.wait_all([j.job_id for j in jobs], say=lambda m: print(f"{PROG}: {m}", flush=True))
        return 0 if set(states.values()) == {"COMPLETED"} else 1
    out, err = slurm.log_paths(jobs[0].job_id, base, res)
    state = slurm.follow(jobs[0].job_id, out, err)
    print(f"{PROG}: job {jobs[0].job_id} ended {state}", flush=True)
    return 0 if state == "COMPLETED" else 1


def run_local(args, base: JobSpec, elements: list[Element], backend: str) -> int:
    """This node's part of the run, or of each element of a sweep, one after another. The output of each also
    goes to LOG_DIR/local-TIME[-INDEX].log (GPT_TRAIN_LOG); the ranks import the code snapshot (not in docker:
    the image is the code) and learn this process's pid (GPT_TRAIN_SUPERVISOR_PID: it passes signals on), or
    docker's container name (GPT_TRAIN_CONTAINER)."""
    if args.after:
        raise UserError("--after needs SLURM (--backend slurm): without a queue, start this run after the other one")
    if args.max_parallel:
        raise UserError("--max-parallel is for SLURM: a local sweep runs its elements one after another")
    if base.nodes > 1 and not args.master_addr:
        raise UserError(f"--nodes {base.nodes} without SLURM needs --master-addr (node 0's address) and --node-rank")
    if not 0 <= args.node_rank < base.nodes:
        raise UserError(f"--node-rank {args.node_rank} is not in 0..{base.nodes - 1}")
    node = local.Node(node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)
    logs = specs.log_dir(base, args.log_dir)
    code = snapshot.plan(logs) if backend == "local" else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    gpus = not args.cpu if args.cpu is not None else shutil.which("nvidia-smi") is not None
    runs = [(e.index, e.spec) for e in elements] or [(None, base)]
    plans = []
    for index, spec in runs:
        log = os.path.join(logs, f"local-{stamp}.log" if index is None else f"local-{stamp}-{index}.log")
        then = chain.fill(args.then, spec.run_dir) if args.then else ""
        if backend == "docker":
            name = f"gpt-train-{spec.job_name}-{secrets.token_hex(3)}"
            commands = {r: local.docker_command(spec, local.Node(r, node.master_addr, node.master_port), args.image,
                                                gpus, name=name, log=log) for r in range(spec.nodes)}
        else:
            assert code is not None
            # the output now goes through a pipe (tee): unbuffered, so that it shows as it comes
            spec = dataclasses.replace(spec, env={**spec.env, "PYTHONUNBUFFERED": "1", "GPT_TRAIN_LOG": log,
                                                  "GPT_TRAIN_SUPERVISOR_PID": str(os.getpid()),
                                                  **snapshot.env(code, dict(os.environ))})
            commands = {r: local.train_command(spec, local.Node(r, node.master_addr, node.master_port),
                                               local.python()) for r in range(spec.nodes)}
        text = [f"# log: {log} (the output below, as on the terminal)"]
        if index is not None:
            text.insert(0, f"# ---- sweep element {index}: {spec.run_dir} ----")
        text.append(local.describe(spec, node, commands))
        if then:
            text.append(f"# then, once it succeeded: {then}")
        plans.append((index, spec, log, commands[node.node_rank], then, "\n".join(text)))
    head = _header(args, base, backend, "", elements)
    if code:
        head.append(f"# code: {code.describe()} (copied before the first start; the ranks import it first)")
    if args.dry_run:
        print("\n".join(head + [p[-1] for p in plans]), flush=True)
        return 0
    if code:
        snapshot.take(code)
    first_bad = 0
    for index, spec, log, argv, then, text in plans:
        with local.tee(log):
            print("\n".join(head + [text]), flush=True)
            rc = _run_node(args, spec, argv, backend)
            if rc == 0 and then:
                rc = _then(then, spec.env)
        first_bad = first_bad or rc
        if rc == protocol.EXIT_REQUEUE:  # stopped by a signal: the same command resumes it (and skips what is done)
            print(f"{PROG}: the run checkpointed and stopped (exit {rc}); the same command resumes it", flush=True)
            break
        if rc and index is not None:
            print(f"{PROG}: sweep element {index} ended with exit {rc}; going on with the next", flush=True)
    return first_bad


def _run_node(args, spec: JobSpec, argv: list[str], backend: str) -> int:
    from gpt_train import supervise

    env = {**os.environ, **spec.env}
    if backend == "docker":  # the image's entrypoint restarts its ranks itself
        return supervise.run_once(argv, env)[0]
    return supervise.supervise(argv, spec.ranks_per_node, env,
                               protocol.MAX_IN_JOB if args.max_restarts is None else args.max_restarts,
                               say=lambda m: print(m, flush=True))


def _then(command: str, env: dict[str, str]) -> int:
    """The --then command after a local run, in the run's environment (its code snapshot), this python's
    folder first on PATH (its `gpt-train`)."""
    path = os.path.dirname(local.python()) + os.pathsep + os.environ.get("PATH", "")
    print(f"{PROG}: then: {command}", flush=True)
    rc = subprocess.run(["bash", "-c", command], env={**os.environ, **env, "PATH": path}).returncode
    if rc:
        print(f"{PROG}: the --then command ended with exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
