"""Jobs in order: `--after JOBID[:ok|any]` starts the training job after another one, and `--then "COMMAND"`
runs a follow-up once the run has finished, e.g. `--then "gpt-train eval {run_dir} --task val"`.

On SLURM both are sbatch dependencies, so nothing waits on the login node: --after becomes
`--dependency=afterok:JOBID` (or afterany), and --then a second, one-task job with `--dependency=afterok:` on
the training job (`aftercorr:` for a sweep: follow-up task i waits for training task i). A requeued job is
PENDING again, not done, so the follow-up waits for the run's real end. Both get `--kill-on-invalid-dep=yes`:
when what they wait for fails, SLURM cancels them instead of leaving them pending forever. Without SLURM the
follow-up runs on this machine after a run that ended with success.
"""

from __future__ import annotations

import re
import shlex

from gpt_train.errors import UserError

RUN_DIR = "{run_dir}"
_AFTER = re.compile(r"^(\d+(?:_\d+)?)(?::(ok|any))?$")


def dependency(afters: list[str]) -> str:
    """sbatch's --dependency for the --after values: afterok:1,afterany:2 (every one must hold)."""
    out = []
    for text in afters:
        m = _AFTER.match(text.strip())
        if not m:
            raise UserError(f"--after {text}: give a SLURM job id, optionally :ok (it succeeded, the default) or "
                            ":any (it ended, however), e.g. --after 1234:any")
        out.append(f"after{m.group(2) or 'ok'}:{m.group(1)}")
    return ",".join(out)


def fill(command: str, run_dir: str) -> str:
    """COMMAND with {run_dir} replaced by the run directory as one shell word. Only that placeholder: a
    command's own braces (${HOME}, awk '{print}') stay as they are."""
    if not command.strip():
        raise UserError("--then: the command is empty")
    return command.replace(RUN_DIR, shlex.quote(run_dir))
