"""What a submission runs, whatever the backend: the config, the user's overrides, a run directory fixed at
submission (so every restart of the job resumes the same run), and the environment of the ranks.

The config is loaded and validated here, for the job's world size, so that a typo or an impossible batch costs
a second on the login node and not a place in the queue.

Environment: settings (NCCL and friends) travel by value; credentials only by name. They reach SLURM jobs by
inheritance (`sbatch --export=ALL`, its default), local runs by inheritance, containers as `-e NAME`; their
values are never put on a command line, in a script or in dry-run output.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpt_train import protocol
from gpt_train.config import Config, load_config, parse_overrides, resolve_config_path, resolve_key, validate
from gpt_train.errors import ConfigError

# Passed by name only. A name matches when it is listed or ends like a secret.
CREDENTIALS = re.compile(r"^(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AWS_[A-Z0-9_]+|GOOGLE_[A-Z0-9_]+|"
                         r"AZURE_[A-Z0-9_]+)$|(_KEY|_TOKEN|_SECRET|_PASSWORD|_CREDENTIALS)$")
# Not secret, but a run needs them where it runs (containers start from an empty environment).
PASSTHROUGH = re.compile(r"^(WANDB_|NCCL_|GLOO_|TORCH_NCCL_|HF_|OMP_NUM_THREADS$)")


def credential_names(environ: dict[str, str] | None = None) -> list[str]:
    """Names of the credentials set in the environment (their values are never read here)."""
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if CREDENTIALS.search(k))


def passthrough_names(environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if PASSTHROUGH.match(k) and not CREDENTIALS.search(k))


def nccl_env(ib: bool | None, socket_ifname: str, nccl_debug: str) -> dict[str, str]:
    """The communication variables for --ib/--no-ib, --socket-ifname, --nccl-debug."""
    return protocol.comm_env(socket_ifname, {True: "on", False: "off", None: "auto"}[ib], nccl_debug)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _parent(url: str) -> str:
    head, sep, _ = url.rstrip("/").rpartition("/")
    return head + sep if sep else ""


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "gpt-train"


@dataclass
class JobSpec:
    config: str  # what the job is given as CONFIG: a preset name, or an absolute file path
    config_path: str  # the file it resolves to, for the user to read
    overrides: list[str]  # the user's key=value, then run_dir=<the fixed run directory>
    run_dir: str
    job_name: str
    nodes: int = 1
    ranks_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)  # set by value in every rank's environment
    inputs: dict[str, str] = field(default_factory=dict)  # local paths the run reads: what -> absolute path

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def train_args(self) -> list[str]:
        """Arguments after `python -m gpt_train`."""
        return ["train", self.config, *self.overrides]

    def train_command(self, python: str = "python") -> list[str]:
        return [python, "-u", "-m", "gpt_train", *self.train_args()]


def build(config: str, overrides: list[str], *, nodes: int, ranks_per_node: int, job_name: str = "",
          run_dir: str = "", env: dict[str, str] | None = None) -> JobSpec:
    """Resolve CONFIG (a path or a preset name; config/NAME.yaml falls back to the preset), validate the config
    with the overrides for nodes x ranks_per_node ranks, and fix the run directory:
    --run-dir if given, else a run_dir=... override, else the config's own run_dir; with a --job-name (and no
    explicit run_dir) the job name replaces the last part of the config's run_dir. Local paths become absolute,
    since the job may start elsewhere."""
    if nodes < 1 or ranks_per_node < 1:
        raise ConfigError(f"--nodes and --gpus must be at least 1 (got {nodes} and {ranks_per_node})")
    path = resolve_config_path(config)
    given = Path(config)
    if given.is_file():
        config_arg = str(given.resolve())
    else:  # a preset: the job resolves the name itself (inside a container too)
        config_arg = path.stem
    user_overrides = list(overrides)
    cfg = load_config(config_arg, user_overrides)
    validate(cfg, nodes * ranks_per_node)
    explicit = any(resolve_key(k) == "run_dir" for k, _ in parse_overrides(user_overrides))
    name = safe_name(job_name or path.stem)
    if run_dir:
        final = run_dir
    elif explicit or not job_name:
        final = cfg.run_dir
    else:
        final = _parent(cfg.run_dir) + name
    if is_local(final):
        final = os.path.abspath(final.removeprefix("file://"))
    kept = [o for o, (k, _) in zip(user_overrides, parse_overrides(user_overrides)) if resolve_key(k) != "run_dir"]
    return JobSpec(config=config_arg, config_path=str(path.resolve()), overrides=kept + [f"run_dir={final}"],
                   run_dir=final, job_name=name, nodes=nodes, ranks_per_node=ranks_per_node, env=dict(env or {}),
                   inputs=local_inputs(config_arg, cfg))


def local_inputs(config_arg: str, cfg: Config) -> dict[str, str]:
    """Every local path the run reads, absolute, by what it is: the config file (a preset is inside the package),
    data.dir (or every folder of data.sources), checkpoint.init_from and model.init_from. Relative paths are the
    job's working directory's, as in the trainer. Left out: URLs, and the default preset's data folder while it
    holds no prepared data, since the trainer prepares the bundled corpus there on first use
    (gpt_train.prepare.ensure_bundled)."""
    found = {"config": config_arg} if os.path.isabs(config_arg) else {}
    data_dirs = ([("data.dir", cfg.data.dir)] if not cfg.data.sources else
                 [(f"data.sources[{i}]", source.dir) for i, source in enumerate(cfg.data.sources)])
    for key, value in (*data_dirs, ("checkpoint.init_from", cfg.checkpoint.init_from),
                       ("model.init_from", cfg.model.init_from)):
        if value and is_local(value):
            found[key] = os.path.abspath(value.removeprefix("file://"))
    data = found.get("data.dir")
    if data and not os.path.exists(data) and Path(data).resolve() == Path(load_config("default").data.dir).resolve():
        del found["data.dir"]
    return found


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def mounts(spec: JobSpec, cwd: str, writable: tuple[str, ...] = ()) -> list[tuple[str, bool]]:
    """The host folders a container of this job sees at the same paths, as (path, writable): the working
    directory, the launcher's own `writable` folders, a local run_dir's parent (the run directory is made in it),
    and every local input that exists, read-only (a config file: its folder, where what it extends lies). A
    folder inside one already given is left out, unless it must be writable and that one is read-only."""
    modes = {os.path.normpath(p): True for p in (cwd, *writable)}
    if is_local(spec.run_dir):
        modes[os.path.normpath(os.path.dirname(spec.run_dir.removeprefix("file://")))] = True
    for what, path in spec.inputs.items():
        if os.path.exists(path):
            modes.setdefault(os.path.normpath(os.path.dirname(path) if what == "config" else path), False)
    keep: list[tuple[str, bool]] = []
    for path in sorted(modes, key=lambda p: (len(p), p)):
        if not any(_within(path, k) and (k_rw or not modes[path]) for k, k_rw in keep):
            keep.append((path, modes[path]))
    return keep


def unmountable(spec: JobSpec, cwd: str) -> list[str]:
    """What a container of this job could not be given, "what path" each: a local input that does not exist on
    this machine, and a folder to mount that does not (a run_dir's parent outside the working directory: docker
    would create it owned by root)."""
    out = [f"{what} {path}" for what, path in spec.inputs.items() if not os.path.exists(path)]
    if is_local(spec.run_dir):
        parent = os.path.dirname(spec.run_dir.removeprefix("file://"))
        if not _within(os.path.normpath(parent), os.path.normpath(cwd)) and not os.path.isdir(parent):
            out.append(f"run_dir's parent {parent}")
    return out


def log_dir(spec: JobSpec, given: str = "") -> str:
    """The job's log folder (--log-dir, default logs/JOB_NAME), absolute: submitit's files, a local run's
    output, the code snapshot."""
    return os.path.abspath(given or os.path.join("logs", spec.job_name))


def quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def job_python() -> str:
    """The python that runs gpt_train in the job: GPT_TRAIN_PYTHON, else this one (a shared venv)."""
    return os.environ.get("GPT_TRAIN_PYTHON") or sys.executable
