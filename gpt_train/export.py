"""`gpt-train export RUN_OR_CHECKPOINT OUT.safetensors`: the model's weights alone, for other tools."""

from __future__ import annotations

import argparse
import json

from safetensors.torch import save_file

from gpt_train.inference import add_checkpoint_argument, find


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run directory (its newest valid checkpoint) or checkpoint folder; any fsspec URL")
    parser.add_argument("out", help="output .safetensors file (local path)")
    add_checkpoint_argument(parser)


def run(args: argparse.Namespace) -> int:
    ckpt = find(args.source, which=args.checkpoint)
    weights = {k: v.contiguous() for k, v in ckpt.model.items()}
    model_cfg = ckpt.meta["config"]["model"]
    metadata = {"format": "gpt-train", "step": str(ckpt.step), "model": json.dumps(model_cfg),
                "tokenizer": json.dumps(ckpt.meta["tokenizer"])}
    save_file(weights, args.out, metadata=metadata)
    print(f"exported {ckpt.url} (step {ckpt.step}, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M parameters) to {args.out}")
    return 0
