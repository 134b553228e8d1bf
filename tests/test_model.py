import math

import pytest
import torch
import torch.nn.functional as F

from gpt_train.config import ModelConfig, load_config
from gpt_train.model import GPT, cross_entropy, padded_vocab


def test_gpt2_small_has_gpt2_small_size():
    cfg = load_config("gpt2", ["vocab_size=50257"]).model
    with torch.device("meta"):
        model = GPT(cfg)
    # Hugging Face's gpt2 has 124,439,808 parameters; padding the vocabulary to 50304 adds 47 rows of 768.
    assert model.num_params(non_embedding=False) == 124_439_808 + 47 * 768
    assert padded_vocab(50257) == 50304 and padded_vocab(64) == 64
    # 6 FLOPs per parameter per token (forward and backward) plus attention's 12 * L * C * T
    assert model.flops_per_token(1024) == 6 * model.num_params() + 12 * 12 * 768 * 1024


def test_initial_loss_is_uniform_and_outputs_shapes():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=1000))
    x = torch.randint(0, 1000, (4, 16))
    logits, loss = model(x, torch.randint(0, 1000, (4, 16)))
    assert logits.shape == (4, 16, padded_vocab(1000))
    assert abs(loss.item() - math.log(padded_vocab(1000))) < 0.1
    last, none = model(x)
    assert last.shape == (4, 1, 1000) and none is None  # generation: last position, real vocabulary only
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=100)).eval()
    x = torch.randint(0, 100, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 100  # change the future only
    a, _ = model(x, x)
    b, _ = model(y, y)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6) and not torch.allclose(a[0, 5:], b[0, 5:])


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=8, vocab_size=100))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(16), rel_tol=0.1)
    assert math.isclose(model.transformer.h[0].mlp.c_fc.weight.std().item(), 0.02, rel_tol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_cpu_cross_entropy_matches_torch(dtype):
    """The CPU loss works a few rows at a time; its value and gradient are F.cross_entropy's on fp32 logits."""
    g = torch.Generator().manual_seed(0)
    n, v = 8 * 5 + 3, 1000  # a last block shorter than the others
    base = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 17, n - 1]] = -1  # ignored positions
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in.float(), targets, ignore_index=-1)
    (ours * 2).backward()  # a non-unit upstream gradient
    (ref * 2).backward()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), rtol=tol, atol=tol)
    assert torch.all(ours_in.grad[[0, 17, n - 1]] == 0)
