"""One typed schema for a run: YAML files (which may extend each other) plus `key=value` overrides.

Everything is validated here, before a model is built or a GPU is touched, so that a typo costs
a second and not a queue slot.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt_train.errors import ConfigError


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # longest context the learned positions cover
    vocab_size: int = 0  # 0: taken from the prepared data's metadata
    dropout: float = 0.0
    bias: bool = True
    init_from: str = ""  # "" = random init; else a local Hugging Face GPT-2 directory (safetensors)


DATA_FORMATS = ("auto", "gpt-train", "llmc", "nanogpt", "npy")  # formats.CHOICES, without importing numpy


@dataclass
class Source:
    """One corpus of a mixture: a folder like data.dir, and its share of the samples (weights need not sum to 1)."""
    dir: str
    weight: float = 1.0
    format: str = "auto"


@dataclass
class DataConfig:
    dir: str = "data/moby-dick-bpe16k"  # output of `gpt-train prepare`: shards plus meta.json (docs/data.md)
    # the token files' format: auto (meta.json, else detected), or llm.c's .bin shards, nanoGPT's train.bin/val.bin
    format: str = field(default="auto", metadata={"choices": DATA_FORMATS})
    # A mixture, in place of data.dir and data.format: samples drawn from each folder in proportion to its weight
    # (docs/data.md). YAML: a list of {dir, weight, format}; command line: data.sources=DIR:WEIGHT,DIR:WEIGHT
    sources: list[Source] = field(default_factory=list, metadata={"sources": True})
    # a data.dir on object storage (s3://, gs://) is read through a cache on local disk (docs/data.md): its bound,
    # in GB (the whole folder, shared by every run and rank that uses it), and where it is
    cache_gb: float = 4.0
    cache_dir: str = "~/.cache/gpt-train/shards"

    def mixture(self) -> list[Source]:
        """The folders the run reads: data.sources, else data.dir alone."""
        return self.sources or [Source(self.dir, 1.0, self.format)]


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 700
    decay_steps: int = 0  # steps from start to the end of the cosine; 0 = train.max_steps
    min_lr: float = 6e-5  # floor the cosine decays to


@dataclass
class TrainConfig:
    max_steps: int = 600_000
    # > 0: train this many passes over the train split (of a mixture: over its most repeated source); max_steps
    # is then derived from the data at start-up, and printed
    epochs: float = 0.0
    batch_tokens: int = 524_288  # global batch per optimizer step, in tokens, for any number of ranks
    micro_batch: int = 16  # at most this many sequences per rank per forward pass (a memory bound; see micro_batch_for)
    seq_len: int = 0  # 0 = model.block_size
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16", "fp16")})
    compile: bool = False
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda", "mps")})
    seed: int = 1337
    deterministic: bool | None = field(default=None, metadata={"tristate": True})  # auto (None): on CPU only
    eval_interval: int = 250  # 0 = only at the end
    eval_batches: int = 20
    log_interval: int = 10
    sample_interval: int = 0  # 0 = only at the end
    sample_tokens: int = 64
    sample_prompt: str = "\n"


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps between checkpoints; 0 = only the final one
    keep_last: int = 3
    keep_best: bool = True
    every_minutes: float = 30.0  # also save when this much wall time passed since the last save; 0 = off
    # auto: the newest valid checkpoint of run_dir; none: start fresh; best: the lowest val loss; a step number:
    # that checkpoint of run_dir (best and a step roll the run back once; the newer checkpoints are set aside)
    resume: str = field(default="auto", metadata={
        "choices": ("auto", "none", "best"), "or_step": True,
        "hint": "to start from another run's weights use checkpoint.init_from={}"})
    overwrite: bool = False  # with resume=none, allow a run_dir that already has checkpoints
    # a gpt-train checkpoint folder or run directory (any fsspec URL) whose weights a new run starts from
    init_from: str = ""
    # a trainer holds RUN/lease.json and renews it; a lease not renewed for this long is taken over
    lease_stale_s: float = 120.0
    # an exact resume needs the checkpoint's seed, batch and data: name the ones a resume may change anyway
    allow_changes: list[str] = field(default_factory=list, metadata={"list": True, "choices": ("seed", "batch", "data")})
    async_save: bool = True  # serialize and upload on a background thread
    # host memory kept between saves for the copy of the state, pinned when it is on a GPU (GB, 1e9 bytes). The
    # rest of the copy is made into memory freed after each write: slower to copy, so training waits longer.
    # 0: nothing kept. GPT-2 small's state with AdamW is 1.5 GB, GPT-2 XL's 18.7 GB.
    host_buffer_gb: float = 8.0


@dataclass
class LoggingConfig:
    wandb: str = field(default="off", metadata={"choices": ("off", "auto", "online", "offline")})
    project: str = "gpt-train"
    name: str = ""  # run name in the dashboard; "" = the run directory's name
    tensorboard: bool = False


@dataclass
class DistributedConfig:
    # ddp: every rank holds the whole model; fsdp: parameters, gradients and AdamW state sharded (fully_shard)
    strategy: str = field(default="ddp", metadata={"choices": ("ddp", "fsdp")})
    backend: str = field(default="auto", metadata={"choices": ("auto", "nccl", "gloo")})  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 600  # rendezvous and collective timeout: a dead peer ends the job instead of hanging it
    # the ranks' waits on rank 0's storage work (the lease, reading and verifying the resume checkpoint, the final
    # upload), on a gloo group of their own: slow storage is not a dead peer
    storage_timeout_s: int = 3600
    # The settings below are applied to the environment before the process group starts. A value set here
    # wins over the environment (it is saved with the run); an unset one ("", 0, auto) leaves it alone.
    master_addr: str = ""  # "" = from the launcher: torchrun's rendezvous, MASTER_ADDR, the first SLURM host
    master_port: int = 0  # 0 = from the launcher (MASTER_PORT; srun: 20000 + job id % 20000; else 29500)
    socket_ifname: str = ""  # NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME, e.g. "eth0", "ib0" or "^lo,docker"
    ib: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})  # NCCL_IB_DISABLE: on=0, off=1
    nccl_debug: str = field(default="", metadata={"choices": ("", "VERSION", "WARN", "INFO", "TRACE")})  # NCCL_DEBUG
    # TORCH_NCCL_ASYNC_ERROR_HANDLING: 1 = a failed or timed-out collective aborts the process (torchrun's default)
    async_error_handling: str = field(default="auto", metadata={"choices": ("auto", "0", "1", "2", "3")})


@dataclass
class PreemptionConfig:
    # each makes the run checkpoint at the next step and exit to be requeued (YAML list or "TERM,USR1")
    signals: list[str] = field(default_factory=lambda: ["TERM", "USR1", "USR2"], metadata={"list": True})
    deadline_margin_s: int = 180  # stop this long before the job's time limit (SLURM), so the checkpoint lands
    # after a SIGTERM, exit to be requeued without a new checkpoint if the ranks did not stop within this time
    # (they stop within two step boundaries; SLURM kills this long after its SIGTERM: KillWait, 30 s by
    # default); 0 = wait however long it takes
    grace_s: float = 25.0


@dataclass
class FaultConfig:
    # No progress (a step, an evaluation, a save) for this long is a hang: every rank that can still run dumps
    # its stacks into RUN/diagnostics/ and exits protocol.EXIT_HANG, to be restarted. 0: derived from the slowest
    # step and save seen in this run (several times over), and at least hang_floor_s, so that a big model's slow
    # save is not a hang. distributed.timeout_s stays the backstop.
    hang_timeout_s: float = 0.0
    hang_floor_s: float = 300.0
    # A non-finite loss or gradient norm skips that optimizer step; this many skipped in a row roll the run back
    # to its last checkpoint and past the data that caused them. 0: never skip, a non-finite loss ends the run.
    max_bad_steps: int = 3
    # Crashes and hangs restarted inside the same allocation (a new srun, or torchrun locally) before the job is
    # requeued; a requeue waits in the queue again, a new srun takes seconds.
    in_job_restarts: int = 2
    # Failures at the same step, from the same checkpoint, restarted this many times stop the job for good:
    # a deterministic bug must not burn the allocation.
    max_restarts_without_progress: int = 2
    # At every start: the device works, a timed all-reduce across the ranks, a timed write/read/delete in run_dir.
    # A node that fails it is left behind when the job is requeued.
    preflight: bool = True


@dataclass
class Config:
    run_dir: str = "runs/default"  # local path or fsspec URL; everything the run writes goes here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size


# Names that users of nanoGPT-style scripts type, mapped to ours.
ALIASES = {
    "learning_rate": "optim.lr",
    "max_iters": "train.max_steps",
    "warmup_iters": "schedule.warmup_steps",
    "lr_decay_iters": "schedule.decay_steps",
    "batch_size": "train.micro_batch",
    "eval_iters": "train.eval_batches",
    "dtype": "train.precision",
    "out_dir": "run_dir",
    "dataset": "data.dir",
    "wandb_project": "logging.project",
    "wandb_run_name": "logging.name",
}

# nanoGPT's keys that name no one key here, with what to write instead: said in place of "unknown key", so that
# a command line from nanoGPT fails with its translation rather than with a guess.
TRANSLATIONS = {
    "gradient_accumulation_steps": "the batch is set in tokens per optimizer step for all ranks together: "
                                   "train.batch_tokens = gradient_accumulation_steps x batch_size x block_size; the "
                                   "accumulation steps follow from it, train.micro_batch and the number of ranks",
    "init_from": "nanoGPT's init_from=resume is checkpoint.resume=auto (the default), scratch is "
                 "checkpoint.resume=none; to start from other weights use model.init_from=DIR (a Hugging Face "
                 "folder) or checkpoint.init_from=PATH (a gpt-train checkpoint or run directory)",
    "wandb_log": "use logging.wandb=online (or offline, or auto: online when an API key is at hand)",
    "eval_only": "run gpt-train eval --task val RUN_DIR instead (it evaluates the newest checkpoint)",
    "always_save_checkpoint": "every checkpoint.interval steps a checkpoint is saved whatever the val loss; "
                              "checkpoint.keep_last and checkpoint.keep_best choose which are kept",
    "decay_lr": "the learning rate always follows warmup and cosine; schedule.min_lr equal to optim.lr with "
                "schedule.warmup_steps=0 keeps it constant",
}


def _leaf_paths(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every settable dotted key of the schema, mapped to its field."""
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaf_paths(hints[f.name], key + "."))
        else:
            out[key] = f
    return out


LEAVES = _leaf_paths()
_BY_LEAF_NAME: dict[str, list[str]] = {}
for _key in LEAVES:
    _BY_LEAF_NAME.setdefault(_key.rsplit(".", 1)[-1], []).append(_key)


def resolve_key(key: str) -> str:
    """Map a user's key (dotted, a unique leaf name, or an alias) to its dotted path in the schema."""
    if key in LEAVES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if key in TRANSLATIONS:
        raise ConfigError(f"config key '{key}' is nanoGPT's: {TRANSLATIONS[key]}")
    owners = _BY_LEAF_NAME.get(key, [])
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {', '.join(owners)}")
    candidates = list(LEAVES) + list(_BY_LEAF_NAME) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a typo in the leaf of a dotted key: compare leaf names
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(_BY_LEAF_NAME), n=1, cutoff=0.6)
        close = [_BY_LEAF_NAME[close[0]][0]] if close else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert a YAML or command-line value to the field's type, or say which key is wrong."""
    if f.metadata.get("tristate"):
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            return None
        return _coerce(key, value, _BOOL_FIELD)
    if f.metadata.get("sources"):
        return _sources(key, value)
    if f.metadata.get("list"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"config key '{key}' expects a list of names (YAML list or 'A,B'), got {value!r}")
        items = [v.strip() for v in items if v.strip()]
        bad = [v for v in items if f.metadata.get("choices") and v not in f.metadata["choices"]]
        if bad:
            raise ConfigError(f"config key '{key}' takes names from {', '.join(f.metadata['choices'])}; got '{bad[0]}'")
        return items
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    bad = ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if isinstance(value, bool):  # a YAML `true` for a string field such as deterministic
        value = "true" if value else "false"
    if value is None:
        value = ""
    if not isinstance(value, (str, int, float)):
        raise bad
    value = str(value)
    choices = f.metadata.get("choices")
    if f.metadata.get("or_step") and value.isdigit():
        return str(int(value))  # a step number: 1200, or 00001200 as its folder spells it
    if choices and value not in choices:
        also = " or a step number" if f.metadata.get("or_step") else ""
        hint = f"; {f.metadata['hint'].format(value)}" if "hint" in f.metadata else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}{also}; got '{value}'{hint}")
    return value


def _sources(key: str, value: Any) -> list[Source]:
    """data.sources from YAML (a list of mappings or of "DIR:WEIGHT") or the command line ("DIR:W,DIR:W")."""
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"config key '{key}' expects a list of {{dir, weight}} (YAML) or DIR:WEIGHT,DIR:WEIGHT, "
                          f"got {value!r}")
    out = []
    for item in items:
        if isinstance(item, Source):
            item = dataclasses.asdict(item)
        if isinstance(item, str):  # the weight follows the last colon, so s3://bucket/dir:0.3 reads as meant
            where, sep, weight = item.strip().rpartition(":")
            try:
                item = {"dir": where, "weight": float(weight)} if sep and where else {"dir": item.strip()}
            except ValueError:
                item = {"dir": item.strip()}
        if not isinstance(item, dict):
            raise ConfigError(f"config key '{key}': each source is a mapping {{dir, weight, format}} or "
                              f"DIR:WEIGHT, got {item!r}")
        known = [f.name for f in dataclasses.fields(Source)]
        for name in item:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                raise ConfigError(f"config key '{key}': a source has no key '{name}'"
                                  + (f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(known)})"))
        where = item.get("dir")
        if not isinstance(where, str) or not where:
            raise ConfigError(f"config key '{key}': every source needs a dir, got {item!r}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"config key '{key}': the weight of '{where}' must be a positive number, got {weight!r}")
        fmt = item.get("format", "auto")
        if fmt not in DATA_FORMATS:
            raise ConfigError(f"config key '{key}': the format of '{where}' must be one of {', '.join(DATA_FORMATS)}; "
                              f"got {fmt!r}")
        out.append(Source(where, float(weight), fmt))
    dirs = [s.dir for s in out]
    for where in dirs:
        if dirs.count(where) > 1:
            raise ConfigError(f"config key '{key}' names '{where}' twice: give it one entry with the summed weight")
    return out


_BOOL_FIELD = dataclasses.field(default=False)
_BOOL_FIELD.type = "bool"


def preset_dir() -> Path:
    """`configs/` of a source checkout (editable installs), else the copy a wheel ships as gpt_train/presets."""
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    return source_tree if source_tree.is_dir() else Path(str(importlib.resources.files("gpt_train") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(name: str) -> Path:
    """A config file path, or a preset name (`gpt2-large`, `configs/gpt2-large.yaml`, `config/gpt2-large.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    preset = preset_dir() / f"{stem}.yaml"
    if preset.is_file() and (len(path.parts) == 1 or path.parent.name in ("config", "configs")):
        return preset
    close = difflib.get_close_matches(stem, preset_names(), n=1)
    hint = f"; did you mean preset '{close[0]}'?" if close else f"; presets: {', '.join(preset_names())}"
    raise ConfigError(f"config file '{name}' not found{hint}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config '{path}' extends itself through {' -> '.join(map(str, seen))}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")  # YAML's encoding, whatever the locale's is
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                          "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}' must be a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = path.parent / parent
    base = _read_yaml(parent_path if parent_path.is_file() else resolve_config_path(str(parent)), seen + (path,))
    return _merge(base, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (key in LEAVES or key in ALIASES):
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (for example optim.lr=3e-4)")
        pairs.append((key.strip(), raw))
    return pairs


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from a file or preset (or the defaults) and `key=value` overrides."""
    cfg = Config()
    items: list[tuple[str, Any]] = []
    if source:
        items += _flatten(_read_yaml(resolve_config_path(source)))
    items += parse_overrides(overrides or [])
    for key, value in items:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def set_value(cfg: Config, key: str, value: Any) -> None:
    path = resolve_key(key)
    *parents, leaf = path.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, _coerce(path, value, LEAVES[path]))


def validate(cfg: Config, world_size: int = 1) -> None:
    """Impossible combinations, each named by the key to change."""
    m, t = cfg.model, cfg.train

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key in LEAVES:  # an inf or NaN anywhere trains garbage, or checkpoints it
        value = get_value(cfg, key)
        if isinstance(value, float):
            need(math.isfinite(value), f"config key '{key}' must be a finite number, got {value}")
    for key in ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "train.max_steps",
                "train.batch_tokens", "train.micro_batch", "train.eval_batches", "train.log_interval", "optim.lr",
                "checkpoint.lease_stale_s", "distributed.storage_timeout_s", "data.cache_gb"):
        need(get_value(cfg, key) > 0, f"config key '{key}' must be positive")
    for key in ("model.vocab_size", "train.seq_len", "train.eval_interval", "train.sample_interval",
                "train.sample_tokens", "schedule.warmup_steps", "schedule.decay_steps", "checkpoint.interval",
                "checkpoint.every_minutes", "checkpoint.host_buffer_gb", "optim.weight_decay", "optim.grad_clip", "optim.eps", "schedule.min_lr",
                "preemption.deadline_margin_s", "preemption.grace_s", "fault.hang_timeout_s", "fault.hang_floor_s",
                "train.epochs",
                "fault.max_bad_steps", "fault.in_job_restarts", "fault.max_restarts_without_progress"):
        need(get_value(cfg, key) >= 0, f"config key '{key}' must not be negative")
    need(m.n_embd % m.n_head == 0, f"config key 'model.n_embd' ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    need(0.0 <= m.dropout < 1.0, "config key 'model.dropout' must be in [0, 1)")
    need(cfg.schedule.min_lr <= cfg.optim.lr, f"config key 'schedule.min_lr' ({cfg.schedule.min_lr}) must not exceed optim.lr ({cfg.optim.lr})")
    need(0.0 <= cfg.optim.beta1 < 1.0 and 0.0 <= cfg.optim.beta2 < 1.0, "config keys 'optim.beta1' and 'optim.beta2' must be in [0, 1)")
    need(t.seq_len <= m.block_size, f"config key 'train.seq_len' ({t.seq_len}) is above model.block_size ({m.block_size})")
    per_rank_step = cfg.seq_len * world_size
    need(t.batch_tokens % per_rank_step == 0,
         f"config key 'train.batch_tokens' ({t.batch_tokens}) must be a multiple of seq_len x ranks "
         f"= {cfg.seq_len} x {world_size} = {per_rank_step}, so that every rank gets whole sequences")
    need(cfg.checkpoint.keep_last >= 1, "config key 'checkpoint.keep_last' must be at least 1")
    need(bool(cfg.run_dir), "config key 'run_dir' must not be empty")
    for name in cfg.preemption.signals:
        full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        need(full in signal.Signals.__members__,  # not hasattr: signal.SIG_DFL and SIG_IGN are handlers
             f"config key 'preemption.signals': '{name}' is not a signal of this system (e.g. TERM, USR1, USR2)")
        need(full not in ("SIGKILL", "SIGSTOP"), f"config key 'preemption.signals': '{name}' cannot be caught "
             "(the kernel acts on SIGKILL and SIGSTOP itself), so it cannot make the run checkpoint; "
             "use e.g. TERM, USR1, USR2")


def warnings(cfg: Config) -> list[str]:
    """Legal settings that are most likely mistakes, one message each naming the keys: printed, not refused."""
    s, max_steps = cfg.schedule, cfg.train.max_steps
    out = []
    if s.warmup_steps > max_steps:
        out.append(f"config key 'schedule.warmup_steps' ({s.warmup_steps}) is larger than train.max_steps ({max_steps}): "
                   f"the learning rate stops at {max_steps / s.warmup_steps:.0%} of optim.lr, still warming up")
    if 0 < s.decay_steps <= s.warmup_steps:
        out.append(f"config key 'schedule.decay_steps' ({s.decay_steps}) is not above schedule.warmup_steps "
                   f"({s.warmup_steps}): no cosine decay, the learning rate drops from optim.lr to schedule.min_lr "
                   "as warmup ends")
    return out


def resolve_vocab(cfg: Config, tokenizer: dict, data_dir: str) -> Config:
    """The config with model.vocab_size taken from the data's tokenizer (0 means: what the data says); a
    different number in the config is an error."""
    data_vocab = tokenizer["n_vocab"]
    if cfg.model.vocab_size not in (0, data_vocab):
        raise ConfigError(f"config key 'model.vocab_size' is {cfg.model.vocab_size} but the data in '{data_dir}' "
                          f"was tokenized with {tokenizer['name']} ({data_vocab} tokens)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))


def with_epochs(cfg: Config, samples_per_epoch: float) -> Config:
    """The config with train.max_steps derived from train.epochs (> 0): enough optimizer steps for that many
    passes, `samples_per_epoch` sequences each (of a mixture: what one pass over its most repeated source takes)."""
    per_step = cfg.train.batch_tokens // cfg.seq_len
    steps = max(1, math.ceil(cfg.train.epochs * samples_per_epoch / per_step - 1e-9))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def micro_batch_for(cfg: Config, world_size: int) -> int:
    """Sequences per forward pass: the largest number up to train.micro_batch that divides each rank's share
    of the global batch. The samples of a step stay the same; only the accumulation steps change."""
    per_rank = cfg.train.batch_tokens // (cfg.seq_len * world_size)
    return max(m for m in range(1, min(cfg.train.micro_batch, per_rank) + 1) if per_rank % m == 0)


def get_value(cfg: Config, key: str) -> Any:
    target = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a config written by `to_dict` (a checkpoint's or a run directory's)."""
    cfg = Config()
    for key, value in _flatten(data):
        set_value(cfg, key, value)
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

