"""`gpt-train plot RUN [RUN...] -o loss.png`: loss and learning rate against step and tokens.

Four panels: train and val loss against step and against tokens, the learning rate against step
and against tokens. Several runs are overlaid, one colour each; each restart of a run is a dotted
vertical line in its colour, at the step (and token count) the run resumed from. Runs are local
paths or any fsspec URL, read the same way `gpt-train status` reads them.

Matplotlib is an optional extra: `pip install gpt-train[plot]`.
"""

from __future__ import annotations

import argparse
import os

from gpt_train.errors import UserError
from gpt_train.status import RunRecords, read_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (local paths or fsspec URLs)")
    parser.add_argument("-o", "--output", default="loss.png", help="image to write; the suffix picks the format "
                        "(png, svg, pdf); default loss.png")
    parser.add_argument("--title", default="", help="figure title (default: the run names)")
    parser.add_argument("--log-loss", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--width", type=float, default=12.0, help="figure width in inches (default 12)")
    parser.add_argument("--height", type=float, default=8.0, help="figure height in inches (default 8)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of a raster image (default 100)")


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional extra: pip install 'gpt-train[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed on a login node
    import matplotlib.pyplot as plt

    return plt


def run(args: argparse.Namespace) -> int:
    plt = _matplotlib()
    runs = [read_run(url) for url in args.runs]
    if not any(r.metrics for r in runs):
        raise UserError("no metrics to plot: " + ", ".join(f"'{r.url}'" for r in runs) + " have no metrics.jsonl records")
    labels = _labels(runs)
    fig = plot_runs(plt, runs, labels, args.title, args.log_loss, (args.width, args.height))
    out = args.output
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    restarts = sum(len(r.restarts()) for r in runs)
    print(f"plot: {out} ({len(runs)} run(s), {restarts} restart(s) marked)")
    return 0


def _labels(runs: list[RunRecords]) -> list[str]:
    """The run folders' names; the full URL where two would read the same."""
    names = [r.label for r in runs]
    return [r.url if names.count(n) > 1 else n for r, n in zip(runs, names)]


def _tokens_at(run: RunRecords):
    """step -> tokens, from the run's own records (interpolated between logged steps)."""
    pairs = sorted({(m["step"], m["tokens"]) for m in run.metrics
                    if isinstance(m.get("step"), int) and isinstance(m.get("tokens"), int)})
    if not pairs:
        return None
    steps, tokens = zip(*pairs)
    per_step = tokens[-1] / steps[-1] if steps[-1] else 0

    def at(step: int) -> float:
        for s, t in pairs:
            if s == step:
                return t
        return step * per_step  # a step without a record: the run's average batch

    return at


def plot_runs(plt, runs: list[RunRecords], labels: list[str], title: str = "", log_loss: bool = False,
              size: tuple[float, float] = (12.0, 8.0)):
    fig, axes = plt.subplots(2, 2, figsize=size, sharex="col", squeeze=False)
    (loss_step, loss_tok), (lr_step, lr_tok) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    restart_labelled = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = colours[i % len(colours)]
        train, val = run.train(), run.val()
        tokens = _tokens_at(run)
        for ax, x in ((loss_step, "step"), (loss_tok, "tokens")):
            pts = [(m[x], m["loss"]) for m in train if isinstance(m.get(x), (int, float))]
            if pts:
                ax.plot(*zip(*pts), color=colour, linewidth=1.2, alpha=0.9, label=f"{label} train")
            pts = [(m[x], m["val_loss"]) for m in val if isinstance(m.get(x), (int, float))]
            bpb = val[-1].get("val_bpb") if val else None  # comparable across tokenizers, unlike the loss
            if pts:
                ax.plot(*zip(*pts), color=colour, linestyle="--", marker="o", markersize=3, linewidth=1,
                        label=f"{label} val" + (f" ({bpb:.3f} bits/byte)" if isinstance(bpb, float) else ""))
        for ax, x in ((lr_step, "step"), (lr_tok, "tokens")):
            pts = [(m[x], m["lr"]) for m in train if isinstance(m.get(x), (int, float)) and isinstance(m.get("lr"), (int, float))]
            if pts:
                ax.plot(*zip(*pts), color=colour, linewidth=1.2, label=label)
        for restart in run.restarts():
            step = restart["resumed_at_step"]
            marks = [(loss_step, step), (lr_step, step)]
            if tokens is not None:
                marks += [(loss_tok, tokens(step)), (lr_tok, tokens(step))]
            for ax, x in marks:
                ax.axvline(x, color=colour, linestyle=":", linewidth=1.2, alpha=0.8,
                           label=None if restart_labelled or ax is not loss_step else "restart")
            restart_labelled = True
            loss_step.annotate(restart["cause"], xy=(step, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                               textcoords="offset points", fontsize=7, color=colour, rotation=90, va="top")
    loss_step.set_ylabel("loss")
    lr_step.set_ylabel("learning rate")
    lr_step.set_xlabel("step")
    lr_tok.set_xlabel("tokens")
    if log_loss:
        loss_step.set_yscale("log")
        loss_tok.set_yscale("log")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    loss_step.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or ", ".join(labels))
    fig.tight_layout()
    return fig
