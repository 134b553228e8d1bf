"""Run one node's ranks (torchrun, or one process) and start them again after a crash or a hang: what the batch
shell's gpt_train_launch (gpt_train/protocol.py) does under SLURM, for the local launcher (`gpt-train-submit
--backend local`) and the Docker image's entrypoint, by the same rules.

    python -m gpt_train.supervise --ranks 2 -- torchrun --nproc-per-node=2 -m gpt_train train default

torchrun reports any failed worker as exit 1, so each rank writes its own code (protocol.EXIT_DIR_VAR) and the
job's is decided from them (protocol.outcome): a checkpointed stop stays 75, a hang 76, a user error 2. The
restarts share one launch id (protocol.LAUNCH_VAR), by which the trainer counts them against
fault.in_job_restarts and past which it exits 75; MAX_IN_JOB caps them here for ranks that die before they can
decide. A stopping signal (SIGTERM, SIGUSR1, SIGUSR2, SIGHUP) is passed on and ends the loop: torchrun hands it
to its workers (--signals-to-handle), which checkpoint and exit 75.

Torch-free, and no other import of this package but protocol: the entrypoint runs it before anything is loaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable

from gpt_train import protocol

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# torchrun passes these on to its workers (by default it passes SIGTERM, SIGINT, SIGHUP and SIGQUIT only), and
# waits this long for them to finish before SIGKILL (by default 30 s): long enough for the step, the final
# checkpoint and its upload, and shorter than docker's --stop-timeout (launch/local.py).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
TORCHRUN_SHUTDOWN_S = 150


def torchrun_flags() -> list[str]:
    """The torchrun options above, those that this torch's torchrun has (imports torch)."""
    import inspect

    from torch.distributed import run as torchrun

    source = inspect.getsource(torchrun)
    return [flag for option, flag in (("--signals-to-handle", f"--signals-to-handle={TORCHRUN_SIGNALS}"),
                                      ("--shutdown-timeout", f"--shutdown-timeout={TORCHRUN_SHUTDOWN_S}"))
            if option in source]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_once(argv: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run the command with stopping signals passed on; (its exit code, the signal passed on, if any)."""
    proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    got: list[str] = []

    def forward(signum, frame):
        got.append(signal.Signals(signum).name)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the child too
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # nothing outlives the supervisor
            proc.kill()
            proc.wait()
    return (128 - rc if rc < 0 else rc), (got[0] if got else None)


def supervise(argv: list[str], ranks: int, env: dict[str, str] | None = None, max_restarts: int = protocol.MAX_IN_JOB,
              say: Callable[[str], None] = print, codes_from_ranks: bool = True) -> int:
    """Run argv until it ends with a code that is not a crash or a hang, at most max_restarts times more; the
    job's exit code. codes_from_ranks=False: argv's own code is the job's (a container that supervises itself)."""
    env = dict(os.environ if env is None else env)
    env.setdefault(protocol.LAUNCH_VAR, uuid.uuid4().hex[:12])
    env.setdefault("GPT_TRAIN_SUPERVISOR_PID", str(os.getpid()))  # `gpt-train cancel` stops the run through us
    env.pop(protocol.PREVIOUS_EXIT_VAR, None)
    restarts = 0
    while True:
        with tempfile.TemporaryDirectory(prefix="gpt-train-exits-") as exits:
            rc, signalled = run_once(argv, {**env, protocol.EXIT_DIR_VAR: exits})
            code = protocol.outcome(rc, exits if codes_from_ranks else None, ranks)
        if not protocol.restartable(code) or signalled:
            return code
        if restarts >= max_restarts:
            say(f"gpt-train: the ranks ended with exit {code} after {restarts} restart(s) (the most): not starting "
                "them again")
            return code
        restarts += 1
        env[protocol.PREVIOUS_EXIT_VAR] = str(code)
        what = f"hung (exit {code}; stacks in RUN/diagnostics/)" if code == protocol.EXIT_HANG else f"crashed (exit {code})"
        say(f"gpt-train: the ranks {what}: restart {restarts}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt_train.supervise", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=1, help="the ranks the command starts on this node")
    p.add_argument("--max-restarts", type=int, default=protocol.MAX_IN_JOB)
    p.add_argument("--torchrun-flags", action="store_true", help="print the torchrun options to add, and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = p.parse_args(argv)
    if args.torchrun_flags:
        print(" ".join(torchrun_flags()))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command")
    return supervise(command, args.ranks, max_restarts=args.max_restarts, say=lambda m: print(m, flush=True))


if __name__ == "__main__":
    sys.exit(main())
