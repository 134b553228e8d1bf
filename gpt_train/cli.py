"""`gpt-train COMMAND ...` (also `python -m gpt_train`, so `torchrun -m gpt_train train ...` works).

Only the module of the command being run is imported: `gpt-train status` on a login node does not
pay for torch, and `gpt-train --help` lists every command from the table below without loading one.

A UserError anywhere below is printed as one line and exits non-zero: a typo in a config key
should read like a sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpt_train.errors import UserError

COMMANDS = {
    "prepare": ("gpt_train.prepare", "tokenize text into train/val token shards"),
    "train": ("gpt_train.train", "train (or resume) a run"),
    "generate": ("gpt_train.sampling", "sample text from a run or checkpoint"),
    "export": ("gpt_train.export", "write a checkpoint's weights as safetensors"),
    "env": ("gpt_train.env", "what a run would see: versions, devices, launcher world, NCCL settings, run_dir"),
    "status": ("gpt_train.status", "where a run stands: step, losses, speed, restarts and their causes"),
    "runs": ("gpt_train.runs", "many runs at a glance: state, SLURM job, step, losses, speed, ETA, restarts"),
    "logs": ("gpt_train.logs", "the logs of every attempt of a run as one stream, with why each one ended"),
    "cancel": ("gpt_train.cancel", "stop a run cleanly (a checkpoint, no requeue) through whatever runs it"),
    "plot": ("gpt_train.plot", "plot loss and lr of one or more runs against step and tokens"),
    "eval": ("gpt_train.evaluate", "evaluate a checkpoint: HellaSwag accuracy or loss on a prepared split"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gpt-train", description="GPT pretraining from one CPU to a GPU cluster")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module = None
    if argv[:1] == ["train"]:  # before torch's import: a job may be signalled during it
        from gpt_train.preemption import listen_early

        listen_early()
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # the top-level parser has no options but --help: the command comes first
            module = importlib.import_module(module_name)
            module.add_arguments(command)
    args = parser.parse_args(argv)
    code = 1
    try:
        code = module.run(args)
    except UserError as e:
        print(f"gpt-train {args.command}: error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"gpt-train {args.command}: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        if args.command == "train":  # for a launcher that sees only torchrun's code (protocol.outcome)
            from gpt_train.protocol import record_exit

            record_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
