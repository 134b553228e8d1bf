"""GPT-2: pre-norm transformer blocks, learned positions, tied input and output embeddings.

B = batch, T = sequence length, C = n_embd, H = n_head, V = padded vocabulary.
Nothing here knows about ranks, checkpoints or logging; only the loss picks its kernels by device type.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_train.config import ModelConfig

TIED_WEIGHT = "lm_head.weight"  # the same matrix as transformer.wte.weight: saved and loaded once, as wte


def padded_vocab(vocab_size: int) -> int:
    """Round the embedding table up to a multiple of 64: matmuls on such shapes run faster."""
    return (vocab_size + 63) // 64 * 64


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,) -> ()
    """Mean cross entropy over targets != -1, computed in fp32 whatever the logits' dtype."""
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return CrossEntropy.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)  # GPUs and inductor fuse the upcast


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=-1) for eager CPUs, a block of rows at a time.

    The same fp32 log-softmax and gradient, but the (N, V) fp32 copies of the logits and of their
    gradient are never built: with GPT-2's vocabulary, those passes over memory cost a CPU as much
    time as all the transformer blocks of a small model.
    """

    ROWS = 8  # an (8, 50304) fp32 block stays in cache

    @staticmethod
    def blocks(n: int) -> list[slice]:
        return [slice(i, i + CrossEntropy.ROWS) for i in range(0, n, CrossEntropy.ROWS)]

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,)
        nll = torch.empty(logits.size(0))  # (N,)
        for r in CrossEntropy.blocks(logits.size(0)):
            logp = torch.log_softmax(logits[r].float(), dim=1)  # (ROWS, V)
            nll[r] = -logp.gather(1, targets[r, None].clamp(min=0)).squeeze(1)
        ctx.save_for_backward(logits, targets)
        valid = targets != -1
        return torch.where(valid, nll, 0.0).sum() / valid.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        valid = targets != -1
        scale = valid * (grad / valid.sum())  # (N,): d loss / d each row's loss
        out = torch.empty_like(logits)  # (N, V)
        for r in CrossEntropy.blocks(logits.size(0)):
            p = torch.softmax(logits[r].float(), dim=1)  # (ROWS, V)
            p[torch.arange(p.size(0)), targets[r].clamp(min=0)] -= 1.0
            out[r] = p.mul_(scale[r, None])
        return out, None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so imported weights give the same logits
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved from the data before building the model"
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        V = padded_vocab(cfg.vocab_size)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                std /= math.sqrt(2 * self.cfg.n_layer)  # GPT-2: each block adds two residual writes
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            logits = self.lm_head(x[:, -1:, :])  # (B, 1, V): generation needs the last position only
            return logits[..., : self.vocab_size], None
        logits = self.lm_head(x)  # (B, T, V)
        # Padding rows of the vocabulary never appear as targets; they only learn to be unlikely.
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting the tied matrix once; non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N plus attention."""
        L, H, C = self.cfg.n_layer, self.cfg.n_head, self.cfg.n_embd
        return 6 * self.num_params() + 12 * L * H * (C // H) * seq_len
