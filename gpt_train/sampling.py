"""Text generation: the `sample` function the trainer calls to show progress, and `gpt-train generate`.

Samples are the cheapest sanity check a run has, so they must be reproducible: every random draw
comes from the caller's generator, and greedy decoding (temperature 0) draws nothing at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt_train.errors import UserError
from gpt_train.model import GPT


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top_k and outside the top_p nucleus. logits: (B, V)."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p: what stays is the smallest
        # set with mass >= top_p, and the most likely token always stays since nothing ranks above it.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, num_samples: int = 1, generator: torch.Generator | None = None,
           eot: int | None = None) -> list[list[int]]:
    """Continue `prompt_ids` num_samples times; returns the new tokens of each sample, without the prompt.

    temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off. A sample that produces
    `eot` ends there, and the eot itself is not returned. Only the last block_size tokens are fed
    to the model. The model's train/eval mode is restored afterwards.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token (GPT-2 uses the end-of-text token as an empty prompt)")
    if max_new_tokens < 0 or num_samples < 1 or temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"invalid sampling settings: max_new_tokens={max_new_tokens}, num_samples={num_samples}, "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    device = next(model.parameters()).device
    block_size = model.cfg.block_size
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)  # (S, T)
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)  # (S,)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # (S, 1, vocab_size)
            logits = logits[:, -1, :].float()  # (S, vocab_size)
            if temperature == 0:
                next_ids = logits.argmax(dim=-1, keepdim=True)  # (S, 1)
            else:
                probs = F.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (S, vocab_size)
                # Draw where the generator lives, so a CPU generator also drives a model on the GPU.
                where = generator.device if generator is not None else device
                next_ids = torch.multinomial(probs.to(where), 1, generator=generator).to(device)  # (S, 1)
            idx = torch.cat([idx, next_ids], dim=1)
            if eot is not None:
                finished |= next_ids[:, 0] == eot
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    samples = idx[:, len(prompt_ids):].tolist()
    if eot is not None:
        # Samples run on together as one batch; cut each at its own first eot.
        samples = [s[: s.index(eot)] if eot in s else s for s in samples]
    return samples


def _checked(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type that also checks the range, so a bad value fails before a model is loaded."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `gpt-train generate`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("source", nargs="?", metavar="RUN_OR_CHECKPOINT",
                        help="run directory or checkpoint folder (local path or fsspec URL)")
    source.add_argument("--hf", metavar="DIR", help="local Hugging Face GPT-2 directory (config.json + safetensors)")
    parser.add_argument("--prompt", default="\n", help="text to continue; empty starts from <|endoftext|>")
    parser.add_argument("--max-new-tokens", type=_checked(int, lambda v: v >= 0, ">= 0"), default=256)
    parser.add_argument("--temperature", type=_checked(float, lambda v: v >= 0, ">= 0"), default=1.0,
                        help="0 = greedy")
    parser.add_argument("--top-k", type=_checked(int, lambda v: v >= 0, ">= 0"), default=0, help="0 = off")
    parser.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                        help="1.0 = off")
    parser.add_argument("--num-samples", type=_checked(int, lambda v: v >= 1, ">= 1"), default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    from gpt_train import inference

    inference.add_checkpoint_argument(parser)


def run(args: argparse.Namespace) -> int:
    """`gpt-train generate`: print each sample after a `----- sample N -----` line."""
    # Imported here: loading pulls in fsspec and the tokenizer, which `--help` does not need.
    from gpt_train import inference

    loaded = inference.load_hf(args.hf, args.device) if args.hf else inference.load(args.source, args.device, args.checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eot]
    if max(prompt_ids) >= model.vocab_size:
        raise UserError(f"the prompt has token id {max(prompt_ids)}, outside the model's vocabulary of {model.vocab_size}")
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    samples = sample(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, num_samples=args.num_samples, generator=generator, eot=tokenizer.eot)
    for i, new_ids in enumerate(samples, start=1):
        print(f"----- sample {i} -----")
        print(args.prompt + tokenizer.decode(new_ids), flush=True)
    return 0
