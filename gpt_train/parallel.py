"""How the model is spread over the ranks (DDP or FSDP2) and its full state read and written the same way
under every strategy, so that a checkpoint of 4 FSDP ranks loads on 1 process and the other way round.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from gpt_train.errors import CheckpointError, ConfigError, UserError
from gpt_train.model import TIED_WEIGHT

if TYPE_CHECKING:
    from gpt_train.distributed import World


def wrap(model: torch.nn.Module, world: World, device: torch.device, cfg) -> torch.nn.Module:
    """The module the training step calls: DDP, or FSDP2 (`fully_shard` on each transformer block, then the
    root), or the model itself for one process. cfg is the run's Config.

    FSDP2 shards the model in place, so the plain module (and `torch.compile`'s wrapper around it) becomes
    the sharded one: build the optimizer from its parameters after this call. Either way the result has
    `no_sync()` for the micro-steps before the last: DDP skips its all-reduce, FSDP its reduce-scatter (the
    gradients of those micro-steps accumulate unsharded, one model's worth of fp32, instead of moving the
    whole model's gradients over the network at every micro-step). Under bf16, FSDP gathers bf16 parameters
    and reduces in fp32 (MixedPrecisionPolicy): half the bytes of every all-gather, no precision lost in the sum."""
    if not world.distributed:
        return model
    if cfg.distributed.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from gpt_train import precision

    prec = precision.choose(cfg.train.precision, device)
    if prec == "fp16":
        raise ConfigError("distributed.strategy=fsdp does not support train.precision=fp16 (its loss scaler would "
                          "see only this rank's shard of the gradients): use bf16 or fp32, or strategy=ddp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if prec == "bf16" else None
    options = {"mesh": init_device_mesh(device.type, (world.world_size,)), **({"mp_policy": policy} if policy else {})}
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper compiles lazily: shard what it wraps
    for block in inner.transformer.h:
        fully_shard(block, reshard_after_forward=True, **options)
    fully_shard(inner, reshard_after_forward=False, **options)  # the root's parameters are used again at once

    @contextlib.contextmanager
    def no_sync():
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)

    inner.no_sync = no_sync
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every rank enters; inside, any one rank may run the model's forward alone (sampling on rank 0).
    FSDP: all-gathers every shard on entry and keeps the full parameters until exit. Others: nothing."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    units = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # back to wrap()'s settings
            unit.set_reshard_after_forward(unit is not inner, recurse=False)
            unit.reshard()


# -- full-state checkpoints, the same for one process, DDP and FSDP -------------------------------------

def _options(model: torch.nn.Module, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers shard by shard into rank 0's host memory; the other ranks get {}. Without FSDP
    # the tensors stay where they are and the checkpointer copies them to pinned memory asynchronously.
    return StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model), **kw)


def model_state(model: torch.nn.Module) -> dict:
    """Full weights with plain names (no `module.` or `_orig_mod.`). Every rank must call it (FSDP gathers);
    only rank 0's result is complete."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(getattr(model, "_orig_mod", model), options=_options(model))
    return {k: v for k, v in state.items() if k != TIED_WEIGHT}


class ModelState:
    """The weights of the plain (unwrapped) model, full and with plain names under every strategy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return model_state(self.model)

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        load_model_state(self.model, state, source)


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Weights saved by `model_state` into the plain model, before it is wrapped or after (a rollback: FSDP2
    has sharded it in place, and each rank keeps its shard of the full tensors); the tied matrix comes with wte."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {TIED_WEIGHT} or unexpected:
        raise CheckpointError(f"checkpoint '{source}' does not fit the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name (`transformer.h.0.mlp.c_fc.weight`), param_groups
    listing names: it loads under any strategy and world size. Every rank must call it; rank 0's is complete."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(getattr(model, "_orig_mod", model), optimizer, options=_options(model))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (every rank passes the whole of it) into this strategy's optimizer.
    State saved by `optimizer.state_dict()` (integer ids, before names were used) is converted first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(model, "_orig_mod", model)
    state = _by_name(inner, optimizer, state)
    set_optimizer_state_dict(inner, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    ids = [p for g in state.get("param_groups", []) for p in g["params"]]
    if not ids or not all(isinstance(p, int) for p in ids):
        return state
    names = {id(p): n for n, p in model.named_parameters()}  # the first name of a tied parameter
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != len(ids):
        raise UserError(f"the checkpoint's optimizer holds {len(ids)} parameters, this model {len(order)}")
    name_of = dict(zip(ids, order))
    return {
        "state": {name_of[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]],
    }

