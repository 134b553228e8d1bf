"""A trained model, ready to use: how `generate`, `eval` and `export` read what training wrote.

A source is a checkpoint folder or a run directory, local or any fsspec URL; a run directory
means its newest checkpoint that verifies (a corrupt or half-written one is skipped, as resume
skips it). The model is built from the config the checkpoint carries, so a command needs no
config of its own, and the tokenizer is the one the checkpoint was trained with. `find` (the
checkpoint of a source, as training's init_from also finds it) is what `export` needs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt_train import parallel
from gpt_train import tokenizer as tokenizers
from gpt_train.checkpoint import find
from gpt_train.config import Config, ModelConfig, from_dict
from gpt_train.distributed import World, pick_device
from gpt_train.model import GPT


@dataclass
class Loaded:
    model: GPT  # in eval mode, on `device`
    tokenizer: tokenizers.Tokenizer
    config: Config | None  # the run's config; None for Hugging Face weights, which come without one
    device: torch.device
    checkpoint: str | None = None  # the checkpoint folder read (None: Hugging Face weights)
    step: int | None = None


def _device(requested: str) -> torch.device:
    return pick_device(requested, World())  # these commands are one process: rank 0's device


def add_checkpoint_argument(parser) -> None:
    """--checkpoint, for the commands that read a run directory's model (generate, eval, export)."""
    parser.add_argument("--checkpoint", default="newest", metavar="WHICH",
                        help="of a run directory: newest (default: its newest valid checkpoint), best (the lowest "
                             "val loss) or a step number")


def load(source: str, device: str = "auto", which: str = "newest") -> Loaded:
    """The model of a checkpoint folder or a run directory, on `device` (auto, cpu, cuda, cuda:N or mps); of a
    run directory, its newest valid checkpoint, its best (which="best") or that of a step (which="1200")."""
    where = _device(device)  # before the checkpoint is read: a missing GPU is reported at once
    ckpt = find(source, which=which)
    cfg = from_dict(ckpt.meta["config"])
    model = GPT(cfg.model)
    parallel.load_model_state(model, ckpt.model, ckpt.url)
    model.to(where).eval()
    return Loaded(model, tokenizers.from_identity(ckpt.meta["tokenizer"], cfg.data.mixture()[0].dir), cfg, where,
                  ckpt.url, ckpt.step)


def load_hf(path: str, device: str = "auto") -> Loaded:
    """GPT-2 weights from a local Hugging Face directory (config.json + safetensors), with GPT-2's tokenizer."""
    from gpt_train.hf import hf_model_config, load_hf_gpt2

    where = _device(device)
    model = GPT(ModelConfig(**hf_model_config(path), init_from=path))
    load_hf_gpt2(model, path)
    model.to(where).eval()
    return Loaded(model, tokenizers.gpt2(), None, where)
