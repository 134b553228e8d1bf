"""Inputs a user can get wrong, each found by a trial: one line from the real CLI, never a traceback, and a
checkpoint that loads into nonsense is skipped like a corrupt one."""

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, cli, losses, one_line_error, tiny_data, train_args  # noqa: F401

# -- config ----------------------------------------------------------------------------------------------

def test_config_file_that_is_not_utf8(tmp_path, tiny_data):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("extends: default\n# caf\u00e9, saved as Latin-1\ntrain:\n  max_steps: 2\n".encode("latin-1"))
    result = cli("train", str(path), f"data.dir={tiny_data}", f"run_dir={tmp_path / 'run'}", *TINY)
    one_line_error(result, "latin1.yaml", "not UTF-8", "line 2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signals, fragments", [
    ("FOO", ["'FOO' is not a signal of this system"]),
    ("SIG_DFL", ["'SIG_DFL' is not a signal of this system"]),
    ("KILL", ["'KILL'", "cannot be caught"]),
    ("TERM,STOP", ["'STOP'", "cannot be caught"]),
])
def test_preemption_signal_that_cannot_be_handled(tmp_path, tiny_data, signals, fragments):
    result = cli(*train_args(tiny_data, str(tmp_path / "run"), "max_steps=2", f"preemption.signals={signals}"))
    one_line_error(result, "preemption.signals", *fragments)
    assert "model:" not in result.stdout and not (tmp_path / "run").exists()


# -- memory ----------------------------------------------------------------------------------------------

def _limited(gigabytes: int):
    """For preexec_fn: the address space capped, so that the real allocator fails as it would on a small device."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gigabytes << 30, gigabytes << 30))
    return apply


@pytest.mark.parametrize("overrides, fragments, started", [
    # 256 sequences of 256 tokens in one forward: the logits alone are 13 GB
    (["model.block_size=256", "train.batch_tokens=65536", "train.micro_batch=256"],
     ["a forward of 256 sequences of 256 tokens per rank does not fit. To fit, lower train.micro_batch (now 256; 128 "
      "would halve the activations)", "train.batch_tokens (65,536) stays the same"], True),
    # 6 billion parameters: the weights alone are 25 GB, before the run has started
    (["model.n_layer=8", "model.n_head=64", "model.n_embd=8192"],
     ["the model (8 layers x 8192 wide) with its gradients and AdamW state does not fit. To fit, choose a smaller "
      "model"], False),
])
def test_out_of_memory_says_what_to_lower_and_is_not_retried(tmp_path, tiny_data, overrides, fragments, started):
    """The CPU allocator's real failure under an 8 GB address-space limit: one line naming the allocation and
    the key to change, the user-error exit code (a restart would only fail again), for a started run a crash
    event with that code, and no checkpoint."""
    import subprocess
    import sys

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), "max_steps=2", *overrides)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_limited(8),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_line_error(result, "out of memory on cpu (rank 0): could not allocate", *fragments)
    assert "can't allocate" not in line and result.returncode == 2, line
    if started:
        events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["start", "crash"] and events[1]["exit_code"] == 2, events
        assert "can't allocate memory" in events[1]["cause"]
    assert not list(run.glob("checkpoints/step-*"))


# -- prepared data ---------------------------------------------------------------------------------------

def _drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


# DATA stands for the copied data directory
@pytest.mark.parametrize("edit, fragments", [
    (lambda meta: [meta], ["DATA/meta.json", "must be a JSON object, not a list"]),
    (lambda meta: {**meta, "dtype": "uint12"}, ["DATA/meta.json", "dtype 'uint12'", "uint16 or uint32"]),
    (lambda meta: {**meta, "dtype": "float32"}, ["DATA/meta.json", "dtype 'float32'"]),
    (_drop("tokenizer"), ["DATA/meta.json", "no 'tokenizer'"]),
    (lambda meta: {**meta, "tokenizer": {**meta["tokenizer"], "n_vocab": "many"}}, ["DATA/meta.json", "n_vocab"]),
    (_drop("splits"), ["DATA/meta.json", "no 'splits'"]),
    (lambda meta: {**meta, "splits": {"train": {"tokens": 1}}}, ["DATA/meta.json", "'train' split", "shards"]),
    (lambda meta: {**meta, "tokenizer": {**meta["tokenizer"], "n_vocab": 1000}},
     ["the 'train' split of", "(meta.json) holds token id", "outside the vocabulary of 1000"]),
    # data prepared before meta.json recorded the largest id: the shards themselves are read
    (lambda meta: {**meta, "tokenizer": {**meta["tokenizer"], "n_vocab": 1000},
                   "splits": {k: {"shards": v["shards"], "tokens": v["tokens"]} for k, v in meta["splits"].items()}},
     ["DATA/train-00000.bin", "holds token id", "outside the vocabulary of 1000"]),
], ids=["list", "dtype-unknown", "dtype-float", "no-tokenizer", "bad-n_vocab", "no-splits", "no-shards",
        "vocab-smaller-than-tokens", "vocab-smaller-than-tokens-unrecorded"])
def test_broken_data_meta(tmp_path, tiny_data, edit, fragments):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(edit(meta)))
    result = cli(*train_args(str(data), str(tmp_path / "run"), "max_steps=2"))
    one_line_error(result, *(f.replace("DATA", str(data)) for f in fragments))
    assert "step    1" not in result.stdout


# -- checkpoints -----------------------------------------------------------------------------------------

STEPS = ["checkpoint.interval=2", "eval_interval=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """A run of 4 steps with checkpoints (and val losses) at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = cli(*train_args(tiny_data, str(run), "max_steps=4", *STEPS))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _rewrite(folder: Path, name: str, data: bytes | None = None, manifest_edit=None) -> None:
    """Replace a file of a checkpoint and its manifest entry, so that size and sha256 still match: only a
    check of the content can find the problem."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    if data is not None:
        (folder / name).write_bytes(data)
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if manifest_edit:
        manifest_edit(manifest)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CORRUPTIONS = {
    "manifest-without-files": (lambda f: _rewrite(f, "", manifest_edit=lambda m: m.pop("files")),
                               "does not list the checkpoint's files"),
    "manifest-without-model": (lambda f: _rewrite(f, "", manifest_edit=lambda m: m["files"].pop("model.pt")),
                               "does not list model.pt"),
    "meta-not-json": (lambda f: _rewrite(f, "meta.json", b'{"step": 4, '), "meta.json' is not a JSON object"),
    "meta-a-list": (lambda f: _rewrite(f, "meta.json", b"[4]"), "meta.json' is not a JSON object"),
    "model-a-list": (lambda f: _rewrite(f, "model.pt", _saved([torch.zeros(2)])),
                     "model.pt' holds a list, not a dict of parameter names to tensors"),
    "model-not-tensors": (lambda f: _rewrite(f, "model.pt", _saved({"transformer.wte.weight": 1})),
                          "model.pt' holds a dict, not a dict of parameter names to tensors"),
    "optimizer-without-state": (lambda f: _rewrite(f, "optimizer.pt", _saved({"scaler": None})),
                                "optimizer.pt' holds a dict, not a dict with the optimizer's state"),
    "rng-not-a-list": (lambda f: _rewrite(f, "rng.pt", _saved({"torch": torch.zeros(2)})),
                       "rng.pt' holds a dict, not a list of each rank's generator states"),
}
FOR_EXPORT = ("manifest-without-files", "manifest-without-model", "meta-not-json", "model-a-list", "model-not-tensors")


def _copy_with_bad_step_4(trained: Path, tmp_path: Path, corruption: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    CORRUPTIONS[corruption][0](run / "checkpoints" / "step-00000004")
    return run


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_bad_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, tiny_data, trained,
                                                                                    corruption):
    run = _copy_with_bad_step_4(trained, tmp_path, corruption)
    result = cli(*train_args(tiny_data, str(run), "max_steps=6", *STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    skipped = re.search(r"checkpoint: skipping step-00000004: (.*)", result.stdout)
    assert skipped and CORRUPTIONS[corruption][1] in skipped[1], result.stdout[-3000:]
    assert re.search(r"resuming from \S+step-00000002 \(step 2\)", result.stdout), result.stdout[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000006"


@pytest.mark.parametrize("corruption", FOR_EXPORT)
def test_export_of_a_bad_checkpoint_is_one_line(tmp_path, trained, corruption):
    run = _copy_with_bad_step_4(trained, tmp_path, corruption)
    result = cli("export", str(run / "checkpoints" / "step-00000004"), str(tmp_path / "out.safetensors"))
    one_line_error(result, "step-00000004", CORRUPTIONS[corruption][1])
    assert not (tmp_path / "out.safetensors").exists()
    # a run directory means its newest checkpoint that loads
    from_run = cli("export", str(run), str(tmp_path / "run.safetensors"))
    assert from_run.returncode == 0 and "(step 2," in from_run.stdout, from_run.stderr[-2000:]


@pytest.mark.parametrize("corruption", ["meta-not-json", "model-a-list"])
def test_resume_best_never_picks_a_checkpoint_that_does_not_load(tmp_path, tiny_data, trained, corruption):
    metas = {s: json.loads((trained / "checkpoints" / f"step-0000000{s}" / "meta.json").read_text()) for s in (2, 4)}
    assert metas[4]["val_loss"] < metas[2]["val_loss"]  # step 4 is the best: its corruption is what is tested
    run = _copy_with_bad_step_4(trained, tmp_path, corruption)
    result = cli(*train_args(tiny_data, str(run), "max_steps=6", "checkpoint.resume=best", *STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    skipped = re.search(r"checkpoint: skipping step-00000004: (.*)", result.stdout)
    assert skipped and CORRUPTIONS[corruption][1] in skipped[1], result.stdout[-3000:]
    assert re.search(r"rolled back from step 4 to the best checkpoint \S+step-00000002 \(step 2,", result.stdout), \
        result.stdout[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
