"""Importing Hugging Face GPT-2 weights must give HF's logits, and bad directories must fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt_train.config import ModelConfig  # noqa: E402
from gpt_train.errors import CheckpointError  # noqa: E402
from gpt_train.hf import hf_model_config, load_hf_gpt2  # noqa: E402
from gpt_train.model import GPT  # noqa: E402

VOCAB = 1000  # not a multiple of 64: exercises the padded rows


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=VOCAB,
                                     activation_function="gelu_new", attn_pdrop=0.0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(path)
    return path, hf


def _imported(path: Path) -> GPT:
    model = GPT(ModelConfig(**hf_model_config(path)))
    load_hf_gpt2(model, path)
    return model.eval()


def test_config_read_from_config_json(hf_dir):
    path, _ = hf_dir
    assert hf_model_config(path) == dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=VOCAB, bias=True)


def test_logits_match_hugging_face(hf_dir):
    path, hf = hf_dir
    model = _imported(path)
    idx = torch.randint(0, VOCAB, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits  # (B, T, VOCAB)
        full, _ = model(idx, targets=idx)  # (B, T, padded V)
        last, _ = model(idx)  # (B, 1, VOCAB)
    assert full.shape[-1] == 1024 and last.shape[-1] == VOCAB
    assert (full[..., :VOCAB] - expected).abs().max().item() <= 1e-5
    assert (last[:, -1] - expected[:, -1]).abs().max().item() <= 1e-5


def test_padding_rows_are_zero_and_head_stays_tied(hf_dir):
    path, hf = hf_dir
    model = _imported(path)
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:VOCAB], hf.transformer.wte.weight)
    assert not wte[VOCAB:].any()
    assert model.lm_head.weight is wte


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    path, _ = hf_dir
    model = GPT(ModelConfig(**{**hf_model_config(path), "block_size": 32}))
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight.*\(64, 64\).*\(32, 64\)"):
        load_hf_gpt2(model, path)


def test_vocab_mismatch_names_both_shapes(hf_dir):
    path, _ = hf_dir
    model = GPT(ModelConfig(**{**hf_model_config(path), "vocab_size": VOCAB + 10}))
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight.*\(1000, 64\).*\(1010, 64\)"):
        load_hf_gpt2(model, path)


def test_directory_without_safetensors_is_refused(hf_dir, tmp_path):
    path, _ = hf_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    model = GPT(ModelConfig(**hf_model_config(tmp_path)))
    with pytest.raises(CheckpointError, match="only pytorch_model.bin.*safetensors only"):
        load_hf_gpt2(model, tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_gpt2(model, tmp_path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_model_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_model_config(tmp_path)


def test_variant_our_model_cannot_compute_is_refused(hf_dir, tmp_path):
    path, _ = hf_dir
    config = (path / "config.json").read_text().replace('"gelu_new"', '"relu"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        hf_model_config(tmp_path)


def test_sharded_safetensors_load(hf_dir, tmp_path):
    path, hf = hf_dir
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, single = _imported(tmp_path), _imported(path)
    for (name, a), b in zip(sharded.state_dict().items(), single.state_dict().values()):
        assert torch.equal(a, b), name
