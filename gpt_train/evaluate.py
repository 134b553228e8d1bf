"""`gpt-train eval RUN --task hellaswag|val`: score a checkpoint.

hellaswag  Multiple-choice completion accuracy on a HellaSwag JSONL file you supply (e.g.
           hellaswag_val.jsonl from github.com/rowanz/hellaswag), scored the way the GPT-2/GPT-3
           papers' zero-shot setup is usually reproduced: the context followed by each ending is
           run through the model, and the ending with the lowest *mean* cross-entropy over its own
           tokens wins (`accuracy`, a.k.a. acc_norm). The lowest *total* loss is reported too
           (`accuracy_sum`). Each line: {"ctx": str, "endings": [4 str], "label": int}; the official
           files' other fields (ctx_a, ctx_b, activity_label, ind, split...) are ignored. Endings are
           encoded with a leading space, as they continue the context's last word.
val        Mean loss and perplexity on a prepared split (default: the run's own data.dir, split val),
           over every window of the split unless --batches limits it; with --batches and
           --micro-batch equal to the run's eval settings, the same windows the training evaluated.

RUN is a run directory (its newest valid checkpoint) or a checkpoint folder, local or any fsspec URL.
A progress bar is drawn only when stderr is a terminal; a SLURM log gets the result lines only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from gpt_train import collectives, data, precision
from gpt_train.errors import DataError, UserError

TASKS = ("hellaswag", "val")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint folder (local or fsspec URL)")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--data", help="hellaswag: the JSONL file (local or fsspec URL); val: a prepared data directory "
                        "(default: the run's data.dir, or each of its data.sources)")
    parser.add_argument("--split", default="val", help="val: which split of the prepared data (default val)")
    parser.add_argument("--limit", type=int, default=0, help="hellaswag: score only the first N items (0 = all)")
    parser.add_argument("--batches", type=int, default=0, help="val: evaluate only this many batches (0 = the whole split)")
    parser.add_argument("--micro-batch", type=int, default=0, help="val: sequences per forward pass (default: the run's)")
    parser.add_argument("--precision", default="", choices=("", "auto", "fp32", "bf16", "fp16"),
                        help="autocast precision (default: the run's train.precision)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from gpt_train import inference

    inference.add_checkpoint_argument(parser)


def progress(iterable, total: int, desc: str):
    """A tqdm bar on an interactive stderr; the bare iterable otherwise (no carriage returns in log files)."""
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="item" if desc == "hellaswag" else "batch", file=sys.stderr,
                dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    from gpt_train import inference  # not at the top: train.py imports this module for val_loss alone

    if args.task == "hellaswag" and not args.data:
        raise UserError("--task hellaswag needs --data FILE: a HellaSwag JSONL file such as hellaswag_val.jsonl")
    t0 = time.perf_counter()
    loaded = inference.load(args.source, args.device, args.checkpoint)
    model, tokenizer, cfg, device = loaded.model, loaded.tokenizer, loaded.config, loaded.device
    prec = precision.choose(args.precision or cfg.train.precision, device)
    if precision.check(prec, device):
        prec = precision.choose("auto", device)
    if args.task == "hellaswag":
        items = read_hellaswag(args.data, args.limit)
        with torch.no_grad(), precision.autocast(prec, device):
            result = hellaswag(model, tokenizer, items, device)
        result["data"] = args.data
    else:
        dirs = [args.data] if args.data else [source.dir for source in cfg.data.mixture()]
        each = [split_loss(model, tokenizer, d, args.split, cfg.seq_len, args.micro_batch or cfg.train.micro_batch,
                           args.batches, device, prec) for d in dirs]
        result = each[0] if len(each) == 1 else {"sources": each}
    result.update(task=args.task, source=args.source, checkpoint=loaded.checkpoint, step=loaded.step, precision=prec,
                  seconds=round(time.perf_counter() - t0, 2))
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.task == "hellaswag":
        print(f"hellaswag: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['items']}, lowest mean loss "
              f"of the ending); by total loss {result['accuracy_sum']:.4f}; {args.data}")
    else:
        for r in result.get("sources", [result]):
            print(f"val: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} on {r['tokens']:,} tokens "
                  f"({r['sequences']} sequences of {cfg.seq_len}) of the '{args.split}' split of {r['data']}")
    return 0


# -- HellaSwag ------------------------------------------------------------------------------------------

def read_hellaswag(path: str, limit: int = 0) -> list[dict]:
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"HellaSwag file '{path}' not found") from None
    except Exception as e:
        raise DataError(f"cannot read '{path}': {type(e).__name__}: {e}") from None
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {n} is not JSON ({e.msg})") from None
        ctx = item.get("ctx") if isinstance(item, dict) else None
        if ctx is None and isinstance(item, dict) and "ctx_a" in item:
            ctx = (item["ctx_a"] + " " + item.get("ctx_b", "").capitalize()).strip()
        endings, label = (item.get("endings"), item.get("label")) if isinstance(item, dict) else (None, None)
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) >= 2
                and all(isinstance(e, str) for e in endings) and isinstance(label, int) and 0 <= label < len(endings)):
            raise DataError(f"'{path}' line {n} is not a HellaSwag item: expected "
                            '{"ctx": str, "endings": [str, str, str, str], "label": int}')
        items.append({"ctx": ctx, "endings": endings, "label": label})
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"'{path}' holds no HellaSwag items")
    return items


def ending_losses(model, ctx_ids: list[int], endings_ids: list[list[int]], device) -> list[tuple[float, int]]:
    """(total cross-entropy, token count) of each ending given the context; one padded batch per item.

    Context and ending together may be longer than the model's block: the context's start is cut.
    """
    block = model.cfg.block_size
    ctx_ids = ctx_ids or [0]
    rows = []
    for end in endings_ids:
        end = end[:block]
        ctx = ctx_ids[-(block + 1 - len(end)):]  # at least one token: the first ending token needs a prediction
        rows.append((ctx + end, len(ctx)))  # an empty ending scores nothing: count 0
    width = max(len(seq) for seq, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (seq, n_ctx) in enumerate(rows):
        seq_t = torch.tensor(seq, dtype=torch.long)
        x[i, : len(seq) - 1] = seq_t[:-1]
        y[i, n_ctx - 1 : len(seq) - 1] = seq_t[n_ctx:]  # only the ending's tokens are scored
    x, y = x.to(device), y.to(device)
    logits, _ = model(x, y)  # (B, T, padded vocab)
    logits = logits[..., : model.vocab_size].float()
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                reduction="none").view(y.shape)  # (B, T), 0 where not scored
    counts = (y != -1).sum(dim=1)
    return [(float(s), int(c)) for s, c in zip(per_token.sum(dim=1).tolist(), counts.tolist())]


def hellaswag(model, tokenizer, items: list[dict], device) -> dict:
    correct = correct_sum = 0
    for item in progress(items, len(items), "hellaswag"):
        ctx_ids = tokenizer.encode(item["ctx"]) or [tokenizer.eot]
        endings_ids = [tokenizer.encode(" " + e.strip()) for e in item["endings"]]
        losses = ending_losses(model, ctx_ids, endings_ids, device)
        mean = [s / c if c else math.inf for s, c in losses]  # an empty ending never wins
        total = [s if c else math.inf for s, c in losses]
        correct += int(min(range(len(mean)), key=mean.__getitem__) == item["label"])
        correct_sum += int(min(range(len(total)), key=total.__getitem__) == item["label"])
    n = len(items)
    return {"items": n, "correct": correct, "accuracy": correct / n, "correct_sum": correct_sum,
            "accuracy_sum": correct_sum / n}


# -- loss on a prepared split -----------------------------------------------------------------------------

def val_loss(model, split: data.Split, batches: int, micro_batch: int, rank: int, world_size: int,
             device: torch.device, prec: str, desc: str | None = None) -> float:
    """Mean loss over `data.eval_batches` of the split: the same windows at every call, whatever the number of
    ranks, each rank its share and the sums all-reduced, so every rank returns the same value.

    Every rank must call it. The model's train/eval mode is restored afterwards. `desc` labels a
    progress bar (on a terminal only); training passes none.
    """
    windows = data.eval_batches(split, batches, micro_batch, rank, world_size)
    was_training = model.training
    model.eval()
    loss_sum = count = 0.0
    try:
        with torch.no_grad():
            for x, y in progress(windows, batches, desc) if desc else windows:
                with precision.autocast(prec, device):
                    _, loss = model(x.to(device), y.to(device))
                loss_sum += loss.item() * len(x)
                count += len(x)
    finally:
        model.train(was_training)
    loss_sum, count = collectives.all_reduce_sum([loss_sum, count], device)
    return loss_sum / count


def split_loss(model, tokenizer, data_dir: str, split_name: str, seq_len: int, micro_batch: int, batches: int,
               device: torch.device, prec: str) -> dict:
    """`gpt-train eval --task val`: the loss over the first `batches` batches of a split (0: all of it)."""
    meta = data.read_meta(data_dir)
    theirs = meta.get("tokenizer", {})
    if theirs.get("sha256") and theirs.get("sha256") != tokenizer.sha256:
        raise DataError(f"'{data_dir}' was tokenized with {theirs.get('name')!r}, the checkpoint uses "
                        f"{tokenizer.name!r}: their losses are not comparable")
    if seq_len > model.cfg.block_size:
        raise DataError(f"seq_len {seq_len} is longer than the model's block_size {model.cfg.block_size}")
    split = data.Split(data_dir, split_name, seq_len)
    total_batches = math.ceil(split.num_windows / micro_batch)
    batches = min(batches, total_batches) if batches > 0 else total_batches
    loss = val_loss(model, split, batches, micro_batch, 0, 1, device, prec, desc=split_name)
    sequences = min(batches * micro_batch, split.num_windows)
    return {"data": data_dir, "split": split_name, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "sequences": sequences, "tokens": sequences * seq_len}
