"""Sweeps: `--sweep KEY=V1,V2,...` (repeatable) is the Cartesian product of the values, one run per element.

Each element is a run of its own: its overrides (the base command's, then its swept values), and its own run
directory under the sweep's folder (--run-dir, else the config's run_dir), named from the swept values, e.g.
`runs/gpt2/lr=1e-4,n_layer=6`. So every element resumes its own checkpoints when it is requeued, and
`gpt-train runs SWEEP_FOLDER` lists them side by side. Every element's config is built and validated here,
before anything is submitted: a key that is not a config key, or a value the key cannot take, is a one-line
error at once.

The order is itertools.product's: the last --sweep varies fastest; the index is the SLURM array task id.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from gpt_train.config import parse_overrides, resolve_key
from gpt_train.errors import ConfigError
from launch.spec import JobSpec

# A value's characters kept in a run directory's name: what needs no quoting in a path, a shell word or a URL
# (an object store's key included: '+' and '%' are read as escapes by some of them). Others become '_', and
# two elements whose names would then collide are refused rather than share a directory.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Axis:
    key: str  # as the user wrote it (optim.lr, lr, learning_rate)
    path: str  # the config's dotted key it resolves to (optim.lr)
    values: tuple[str, ...]


@dataclass(frozen=True)
class Element:
    index: int
    overrides: tuple[str, ...]  # this element's swept key=value, in --sweep order
    name: str  # its run directory's name under the sweep folder
    spec: JobSpec  # its whole job: the base overrides, the swept ones, run_dir=<its own>


def parse_axis(text: str) -> Axis:
    """`KEY=V1,V2,...` as an Axis; the key must be a config key (resolve_key says which one was meant)."""
    try:
        ((key, raw),) = parse_overrides([text])
        path = resolve_key(key)
    except ConfigError as e:
        raise ConfigError(f"--sweep {text}: {e}") from None
    values = tuple(v.strip() for v in raw.split(","))
    if not raw or any(not v for v in values):
        raise ConfigError(f"--sweep {text}: give the values comma-separated, none empty (KEY=V1,V2,...)")
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep {text}: a value is given twice")
    if path == "run_dir":
        raise ConfigError("--sweep run_dir: each element's run directory is made from its values; sweep others")
    return Axis(key=key, path=path, values=values)


def _labels(axes: list[Axis]) -> list[str]:
    """The name of each key in a run directory: its last part (lr), or the whole key where two share it."""
    leaves = [a.path.rsplit(".", 1)[-1] for a in axes]
    return [leaf if leaves.count(leaf) == 1 else a.path for a, leaf in zip(axes, leaves)]


def join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def expand(texts: list[str], base: JobSpec, base_overrides: list[str],
           build: Callable[[list[str], str], JobSpec]) -> list[Element]:
    """The elements of `--sweep TEXT ...` around the BASE job: build(overrides, run_dir) makes (and validates)
    each element's job. BASE_OVERRIDES are the user's own; a key both set there and swept is refused."""
    axes = [parse_axis(t) for t in texts]
    paths = [a.path for a in axes]
    for path in paths:
        if paths.count(path) > 1:
            raise ConfigError(f"--sweep: {path} is swept twice: give all its values in one --sweep")
    fixed = {resolve_key(k): k for k, _ in parse_overrides(base_overrides)}
    for a in axes:
        if a.path in fixed:
            raise ConfigError(f"{fixed[a.path]} is both set and swept (--sweep {a.key}=...): drop one")
    labels = _labels(axes)
    elements: list[Element] = []
    seen: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*(a.values for a in axes))):
        name = ",".join(f"{label}={_UNSAFE.sub('_', v)}" for label, v in zip(labels, combo))
        if name in seen:
            raise ConfigError(f"--sweep: elements {seen[name]} and {index} would share the run directory {name} "
                              "(their values differ only in characters a directory name cannot keep)")
        seen[name] = index
        overrides = tuple(f"{a.key}={v}" for a, v in zip(axes, combo))
        spec = build([*base_overrides, *overrides], join(base.run_dir, name))
        elements.append(Element(index=index, overrides=overrides, name=name, spec=spec))
    return elements


def table(elements: list[Element]) -> list[str]:
    """The elements as aligned comment lines: index, swept overrides, run directory."""
    rows = [("index", "overrides", "run_dir")] + [(str(e.index), " ".join(e.overrides), e.spec.run_dir)
                                                   for e in elements]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return [f"# {r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
