"""Start from OpenAI's GPT-2 weights as Hugging Face stores them, without importing transformers.

Only a local directory written by `save_pretrained` is read (config.json plus safetensors), so a
run never reaches the network and never unpickles a file: a `pytorch_model.bin` can execute code
when loaded, which is why it is refused rather than read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gpt_train.errors import CheckpointError
from gpt_train.model import GPT, TIED_WEIGHT, padded_vocab

# HF's GPT-2 keeps these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers versions saved; our attention builds its mask itself.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# HF activations that are the tanh-approximated GELU our MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face directory '{path}' does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"Hugging Face directory '{path}' has no config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{file}' is not valid JSON: {e}") from None


def hf_model_config(path: str | Path) -> dict[str, Any]:
    """Our ModelConfig fields for the GPT-2 in `path`; refuses variants our model would compute differently."""
    path = Path(path)
    hf = _read_config(path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"'{path}' holds a '{hf['model_type']}' model; only GPT-2 weights can be imported")
    try:
        out = dict(n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(hf["n_embd"]),
                   block_size=int(hf.get("n_positions", hf.get("n_ctx"))), vocab_size=int(hf["vocab_size"]),
                   bias=True)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"'{path / 'config.json'}' lacks a valid GPT-2 field: {e}") from None
    # Defaults below are HF's own, for config.json files that leave them out.
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
        unsupported.append(f"activation_function={hf['activation_function']!r} (ours is tanh GELU)")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        unsupported.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (ours is 1e-5)")
    if hf.get("n_inner") not in (None, 4 * out["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']} (ours is 4 x n_embd)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("non-standard attention scaling")
    if not hf.get("tie_word_embeddings", True):
        unsupported.append("tie_word_embeddings=false (ours ties lm_head to wte)")
    if unsupported:
        raise CheckpointError(f"'{path}' is a GPT-2 variant gpt-train cannot reproduce: {'; '.join(unsupported)}")
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():  # save_pretrained shards large models (gpt2-xl in fp32) across files
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"'{index}' is not a valid safetensors index: {e}") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"'{index}' names shard '{shard}', which is missing")
            tensors.update(load_file(path / shard))
        return tensors
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face directory '{path}' does not exist")
    if (path / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"'{path}' has only pytorch_model.bin; gpt-train reads safetensors only, because unpickling can run "
            "code. Convert it once with transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR)")
    raise CheckpointError(f"'{path}' has no model.safetensors (or model.safetensors.index.json)")


def load_hf_gpt2(model: GPT, path: str | Path) -> None:
    """Copy the GPT-2 weights in `path` into `model` in place; `model` must be built from hf_model_config(path)."""
    path = Path(path)
    theirs = {k.removeprefix("transformer."): v for k, v in _read_tensors(path).items()
              if not k.endswith(_MASK_BUFFERS)}
    # GPT-2 ties lm_head to wte, so save_pretrained usually drops it; if present it must be the same matrix.
    lm_head = theirs.pop(TIED_WEIGHT, None)
    if lm_head is not None and not torch.equal(lm_head, theirs.get("wte.weight", lm_head)):
        raise CheckpointError(f"'{path}' has an lm_head that differs from wte; gpt-train needs them tied")
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != TIED_WEIGHT}
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if missing or unexpected:
        raise CheckpointError(f"'{path}' does not match the model: missing {missing or 'none'}, "
                              f"unexpected {unexpected or 'none'}")
    with torch.no_grad():  # state_dict tensors share storage with the parameters: copying fills the model
        for name, target in ours.items():
            source = theirs[name].t() if name.endswith(_CONV1D) else theirs[name]
            if name == "wte.weight":
                _copy_embedding(target, source, model.vocab_size)
                continue
            if source.shape != target.shape:
                raise CheckpointError(f"tensor 'transformer.{name}' has shape {tuple(source.shape)} in '{path}' "
                                      f"but the model expects {tuple(target.shape)}")
            target.copy_(source)


def _copy_embedding(target: torch.Tensor, source: torch.Tensor, vocab_size: int) -> None:
    """HF's table has exactly vocab_size rows; ours has padding rows after them, which no text uses.

    Zeroing them makes an import reproducible; generation slices them off, and as targets they never occur.
    """
    expected = (vocab_size, target.shape[1])
    if tuple(source.shape) != expected:
        raise CheckpointError(f"tensor 'transformer.wte.weight' has shape {tuple(source.shape)} but the model "
                              f"expects {expected} (padded to {tuple(target.shape)}, vocab_size {vocab_size} "
                              f"rounded up to {padded_vocab(vocab_size)})")
    target.zero_()
    target[:vocab_size].copy_(source)
