"""Checkpoints: never half-written, verified before loading, and an exact resume after a real kill -9."""

import contextlib
import errno
import gc
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_train import checkpoint
from gpt_train.checkpoint import Checkpointer, _HashingFile, load
from gpt_train.errors import CheckpointError, StorageError
from gpt_train.rundir import list_steps
from gpt_train.storage import Store
from helpers import REPO, cli, losses, tiny_data, train_args  # noqa: F401


def state(step: int) -> tuple[dict, dict, list, dict]:
    """Contents that identify the step they were saved at."""
    g = torch.Generator().manual_seed(step)
    model = {"w": torch.randn(64, 64, generator=g), "b": torch.full((64,), float(step))}
    return model, {"optimizer": {"state": {}, "param_groups": []}, "scaler": None}, [{"rank": 0}], {"step": step, "val_loss": None}


def save(ck: Checkpointer, step: int, val_loss=None, final=False) -> None:
    model, opt, rng, meta = state(step)
    ck.save(step, model, opt, rng, {**meta, "val_loss": val_loss, "final": final})
    assert ck.wait(), ck.last_error


@pytest.fixture
def mem_run():
    url = f"memory://runs/{random.getrandbits(64):x}"
    yield url
    Store(url).remove("")


def test_layout_manifest_and_latest(mem_run):
    ck = Checkpointer(mem_run, keep_last=3, keep_best=True, log=lambda m: None)
    save(ck, 7)
    store = Store(mem_run)
    assert store.listdir("checkpoints") == ["LATEST", "step-00000007"]
    assert store.read_text("checkpoints/LATEST").strip() == "step-00000007"
    files = store.listdir("checkpoints/step-00000007")
    assert files == ["MANIFEST.json", "meta.json", "model.pt", "optimizer.pt", "rng.pt"]
    manifest = json.loads(store.read_text("checkpoints/step-00000007/MANIFEST.json"))
    assert set(manifest["files"]) == {"meta.json", "model.pt", "optimizer.pt", "rng.pt"}
    loaded = load(f"{mem_run}/checkpoints/step-00000007")
    assert torch.equal(loaded.model["w"], state(7)[0]["w"]) and loaded.step == 7


def test_corrupt_or_unfinished_checkpoints_are_skipped(mem_run):
    ck = Checkpointer(mem_run, keep_last=5, keep_best=False, log=lambda m: None)
    for s in (1, 2, 3):
        save(ck, s)
    store = Store(mem_run)
    data = bytearray(store.read_bytes("checkpoints/step-00000003/model.pt"))
    data[-10] ^= 0xFF
    store.write_bytes("checkpoints/step-00000003/model.pt", bytes(data))  # a flipped bit
    store.remove("checkpoints/step-00000002/MANIFEST.json")  # a writer that died before its manifest
    store.write_bytes("checkpoints/step-00000009/model.pt", b"partial")  # and one that died early
    logs = []
    found = Checkpointer(mem_run, 5, False, log=logs.append).load_newest()
    assert found.step == 1
    assert any("skipping step-00000003" in m and "corrupt" in m for m in logs)
    with pytest.raises(CheckpointError, match="has no MANIFEST.json"):
        load(f"{mem_run}/checkpoints/step-00000002")


def test_retention_keeps_last_best_and_final(mem_run):
    ck = Checkpointer(mem_run, keep_last=2, keep_best=True, log=lambda m: None)
    save(ck, 1, val_loss=5.0)
    save(ck, 2, val_loss=3.0)  # the best
    save(ck, 3, val_loss=4.0, final=True)
    for s in (4, 5, 6):
        save(ck, s, val_loss=4.5)
    Store(mem_run).write_bytes("checkpoints/step-00000000/model.pt", b"leftover of a killed writer")
    save(ck, 7, val_loss=4.5)
    assert ck.manifested_steps() == [2, 3, 6, 7]
    assert [s for s, _ in list_steps(ck.store)] == [2, 3, 6, 7]
    assert ck.load_best().url.endswith("step-00000002")


def test_foreign_pickle_is_refused(mem_run):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ck = Checkpointer(mem_run, keep_last=1, keep_best=False, log=lambda m: None)
    save(ck, 1)
    store = Store(mem_run)
    payload = pickle.dumps(Evil())
    store.write_bytes("checkpoints/step-00000001/model.pt", payload)
    manifest = json.loads(store.read_text("checkpoints/step-00000001/MANIFEST.json"))
    manifest["files"]["model.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    store.write_text("checkpoints/step-00000001/MANIFEST.json", json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a gpt-train checkpoint file") as refused:
        load(f"{mem_run}/checkpoints/step-00000001")
    # torch's hint (load it with weights_only=False) would run the payload: not advice to pass on
    message = str(refused.value)
    assert "weights_only" not in message and "Re-running" not in message and "torch.load" not in message
    assert "objects gpt-train does not load" in message and "nothing in it was executed" in message
    with pytest.raises(CheckpointError, match="not a gpt-train checkpoint"):
        Store(mem_run).write_text("other/MANIFEST.json", "{}")
        load(f"{mem_run}/other")


def test_failed_upload_is_retried_then_reported_and_training_state_kept(mem_run, monkeypatch):
    logs = []
    ck = Checkpointer(mem_run, keep_last=2, keep_best=False, retries=2, log=logs.append)
    save(ck, 1)
    calls = {"n": 0}
    real = Store.write_bytes

    def flaky(self, rel, data):
        calls["n"] += 1
        raise OSError("connection reset")

    monkeypatch.setattr(Store, "write_bytes", flaky)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    model, opt, rng, meta = state(2)
    ck.save(2, model, opt, rng, meta)
    assert not ck.wait() and calls["n"] == 2
    assert any("FAILED to write step-00000002" in m and "last good checkpoint is step-00000001" in m for m in logs)
    monkeypatch.setattr(Store, "write_bytes", real)
    assert ck.load_newest().step == 1


def test_save_snapshots_so_training_can_change_the_weights_at_once(mem_run):
    ck = Checkpointer(mem_run, keep_last=1, keep_best=False, log=lambda m: None)
    weights = {"w": torch.zeros(512, 512)}
    ck.save(1, weights, {"optimizer": {}}, [], {"step": 1})
    weights["w"].add_(1.0)  # the next optimizer step, while the writer runs
    assert ck.wait()
    assert torch.count_nonzero(load(f"{mem_run}/checkpoints/step-00000001").model["w"]) == 0


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def any_run(request, tmp_path, mem_run):
    """A run directory on local disk, on memory:// and on moto's S3."""
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "memory":
        return mem_run
    return f"{request.getfixturevalue('s3_bucket')}/run"


def test_large_files_are_streamed_and_the_manifest_matches_them(any_run, monkeypatch):
    big = 96 << 20  # bytes in each of model.pt and optimizer.pt: past s3fs's 50 MiB part, two parts
    g = torch.Generator().manual_seed(3)
    model = {"w": torch.randn(big // 4, generator=g), "b": torch.randn(7, generator=g)}
    optimizer = {"optimizer": {"state": {"w": {"exp_avg": torch.randn(big // 4, generator=g)}}, "param_groups": []}}
    largest = []  # the largest single write each file receives: what its store has to buffer
    real = Store.open_write

    @contextlib.contextmanager
    def recorded(self, rel):
        with real(self, rel) as f:
            sizes = [0]
            write = f.write
            f.write = lambda data: sizes.append(len(data)) or write(data)
            yield f
        largest.append(max(sizes))

    monkeypatch.setattr(Store, "open_write", recorded)
    ck = Checkpointer(any_run, keep_last=1, keep_best=False, log=lambda m: None)
    ck.save(1, model, optimizer, [{"rank": 0}], {"step": 1})
    assert ck.wait(), ck.last_error
    assert max(largest) <= _HashingFile.PIECE < big  # no file went to the store in one piece

    folder = Store(f"{any_run}/checkpoints/step-00000001")
    manifest = json.loads(folder.read_text("MANIFEST.json"))
    for name, entry in manifest["files"].items():
        data = Path(folder.path(name)).read_bytes() if folder.local else folder.read_bytes(name)
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert manifest["files"]["model.pt"]["bytes"] > big
    loaded = load(folder.url)
    assert torch.equal(loaded.model["w"], model["w"])
    assert torch.equal(loaded.optimizer["optimizer"]["state"]["w"]["exp_avg"], optimizer["optimizer"]["state"]["w"]["exp_avg"])
    if folder.local:
        assert sorted(os.listdir(folder.path())) == ["MANIFEST.json", "meta.json", "model.pt", "optimizer.pt", "rng.pt"]


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_write_that_fails_half_way_leaves_nothing(where, tmp_path, request):
    url = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"
    store = Store(url)
    with pytest.raises(StorageError, match=r"cannot write '.*/big\.pt': ValueError: serializer broke"):
        with store.open_write("big.pt") as f:
            f.write(os.urandom(1 << 20) * 60)  # 60 MiB: on S3 a multipart upload has begun
            raise ValueError("serializer broke")
    assert store.listdir() == []  # no temporary file, no object
    if where == "s3":
        bucket = url[len("s3://"):].split("/")[0]
        assert not store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")  # no parts kept


def test_a_disk_that_fills_during_serialization_is_reported_as_full(tmp_path, monkeypatch):
    real = Store.open_write

    @contextlib.contextmanager
    def filling(self, rel):
        with real(self, rel) as f:
            if rel.endswith("model.pt"):
                def write(data):
                    raise OSError(errno.ENOSPC, "No space left on device")
                f.write = write
            yield f

    monkeypatch.setattr(Store, "open_write", filling)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    ck = Checkpointer(str(tmp_path / "run"), keep_last=1, keep_best=False, retries=1, log=lambda m: None)
    ck.save(1, {"w": torch.randn(1 << 20)}, {"optimizer": {}}, [], {"step": 1})
    assert not ck.wait()
    assert ck.last_error.startswith("StorageError: no space left on device writing '")  # not torch's "unexpected pos"
    assert os.listdir(tmp_path / "run" / "checkpoints" / "step-00000001") == []


def staged(ck: Checkpointer) -> list[torch.Tensor]:
    """The staging buffers the checkpointer keeps between saves."""
    out, todo = [], [ck._staging.kept]
    while todo:
        node = todo.pop()
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)
    return out


@pytest.fixture
def cycles_kept(monkeypatch):
    """The cyclic garbage collector off, and Store.remove leaving a reference cycle through its frame, as
    fsspec's sync() does on S3 (it keeps the exception it raises in a local): a frame in a cycle holds its
    callers' frames, so only what no frame names of its own is freed when the last reference goes."""
    real = Store.remove

    def remove(self, rel):
        try:
            raise FileNotFoundError(rel)
        except FileNotFoundError as e:
            kept = e  # noqa: F841
        real(self, rel)

    monkeypatch.setattr(Store, "remove", remove)
    gc.disable()
    yield
    gc.enable()


def test_staging_buffers_stay_within_the_host_budget(mem_run, monkeypatch, cycles_kept):
    made = []
    real = checkpoint._host_empty
    monkeypatch.setattr(checkpoint, "_host_empty", lambda *a, **kw: made.append(weakref.ref(t := real(*a, **kw))) or t)
    weights = {"a": torch.randn(256, 256), "b": torch.randn(256, 128)}  # 256 KiB and 128 KiB
    opt = {"optimizer": {"state": {}, "param_groups": []}}

    # Budget 0: a private copy for each save, gone once it is written
    ck = Checkpointer(mem_run, keep_last=3, keep_best=False, log=lambda m: None, host_budget_bytes=0)
    for step in (1, 2):
        ck.save(step, weights, opt, [], {"step": step})
        assert ck.wait(), ck.last_error
        assert staged(ck) == []
        assert len(made) == 2 * step and all(ref() is None for ref in made)
    assert torch.equal(load(f"{mem_run}/checkpoints/step-00000002").model["b"], weights["b"])

    # Room for "a" only: its buffer is kept and reused, "b" is copied afresh each time
    made.clear()
    ck = Checkpointer(mem_run, keep_last=3, keep_best=False, log=lambda m: None, host_budget_bytes=300 << 10)
    ck.save(3, weights, opt, [], {"step": 3})
    assert ck.wait(), ck.last_error
    (kept,) = staged(ck)
    assert kept.shape == weights["a"].shape and kept.untyped_storage().nbytes() == 256 * 256 * 4  # exact size
    weights["a"].add_(1.0)
    ck.save(4, weights, opt, [], {"step": 4})
    assert ck.wait(), ck.last_error
    assert staged(ck)[0] is kept and len(made) == 3  # a, b, then b again
    assert [ref() is None for ref in made] == [False, True, True]
    assert torch.equal(load(f"{mem_run}/checkpoints/step-00000004").model["a"], weights["a"])


class FakeCudart:
    """torch.cuda.cudart() for a machine without a GPU: records what would be pinned, and may refuse."""

    class cudaError:
        success = 0

    def __init__(self, refuse: bool = False):
        self.refuse, self.calls = refuse, []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes))
        return 2 if self.refuse else 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0

    def cudaGetErrorString(self, result):
        return "out of memory"


def test_pinned_staging_is_registered_at_its_size_and_unregistered_with_its_tensor(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    t = checkpoint._host_empty(torch.Size((1000, 3)), torch.bfloat16, pinned_for=torch.device("cuda", 0))
    ptr = t.data_ptr()
    assert cudart.calls == [("register", ptr, 6000)]  # exactly its bytes: no rounding up
    assert t.shape == (1000, 3) and t.dtype == torch.bfloat16 and t.untyped_storage().nbytes() == 6000
    view = t[10:]
    del t
    assert len(cudart.calls) == 1  # a view still uses the pages
    del view
    assert cudart.calls == [("register", ptr, 6000), ("unregister", ptr)]

    # CUDA refuses: one message, pageable copies from then on
    refusing = FakeCudart(refuse=True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: refusing)
    staging = checkpoint._Staging(1 << 20)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), shape=torch.Size((4, 4)), dtype=torch.float32)
    assert staging._new(on_gpu).shape == (4, 4) and staging.pin_error == "cudaHostRegister of 64 bytes: out of memory"
    staging._new(on_gpu)
    gc.collect()
    assert [c[0] for c in refusing.calls] == ["register"]  # tried once; pages never registered are not unregistered


WRITER = textwrap.dedent("""
    import sys, torch
    from gpt_train.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep_last=2, keep_best=False, asynchronous=True, log=lambda m: None)
    step = int(sys.argv[2])
    print("ready", flush=True)  # imports take seconds on a loaded machine: the kill times count from here
    while True:
        step += 1
        g = torch.Generator().manual_seed(step)
        ck.save(step, {"w": torch.randn(256, 1024, generator=g)}, {"optimizer": {}}, [], {"step": step})
""")


def test_kill_at_random_points_during_saves_always_leaves_a_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(0)
    deadline = time.monotonic() + 60
    trials = 0
    last = 0
    while trials < 12 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(last)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        trials += 1
        found = Checkpointer(str(run), 2, False, log=lambda m: None).load_newest()
        if found is None:  # killed before the first save of the first trial completed
            assert trials == 1
            continue
        expected = torch.randn(256, 1024, generator=torch.Generator().manual_seed(found.step))
        assert torch.equal(found.model["w"], expected)
        assert found.step >= last
        last = found.step
    assert trials >= 5 and last > 0


def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_data):
    steps = ["max_steps=12", "checkpoint.interval=3", "eval_interval=6", "sample_tokens=4"]
    ref = tmp_path / "ref"
    assert cli(*train_args(tiny_data, str(ref), *steps)).returncode == 0

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), *steps)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    landed = 0  # checkpoints are written in the background: step 6's may land after step 8 is printed
    for line in proc.stdout:
        if m := re.match(r"checkpoint: saved .*step-(\d+)", line):
            landed = int(m[1])
        if (m := re.match(r"step +(\d+)/12 \| loss", line)) and landed == 6 and int(m[1]) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = max(losses(run))

    resumed = cli(*train_args(tiny_data, str(run), *steps))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # step 9's save may have landed between the line read and the kill; either way steps past it are redone
    resumed_at = int(re.search(r"resuming from \S+ \(step (\d+)\)", resumed.stdout)[1])
    assert resumed_at in (6, 9) and done_before_kill > resumed_at, (resumed_at, done_before_kill)
    assert losses(run) == losses(ref)  # every step, exactly, and none counted twice
    a = load(f"{ref}/checkpoints/step-00000012")
    b = load(f"{run}/checkpoints/step-00000012")
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    events = [json.loads(x) for x in Path(run, "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "crash", "resume", "finish"]
    # the killed attempt could not say how it ended: the next start did, from what it last logged
    assert events[1]["recorded_by"] == "the next start" and events[1]["step"] == done_before_kill

    # the same run exported and sampled, from the run directory (its latest checkpoint)
    out = tmp_path / "model.safetensors"
    assert cli("export", str(run), str(out)).returncode == 0
    exported = load_file(str(out))
    assert all(torch.equal(exported[k], b.model[k]) for k in b.model)
    sampled = cli("generate", str(run), "--prompt", "Call me", "--max-new-tokens", "5", "--seed", "1")
    assert sampled.returncode == 0 and sampled.stdout.count("Call me") == 1


@pytest.mark.s3
def test_s3_run_resumes_and_survives_a_corrupt_shard_and_a_lost_manifest(s3_bucket, tiny_data):
    run = f"{s3_bucket}/runs/one"
    steps = ["max_steps=6", "checkpoint.interval=2", "eval_interval=2", "sample_tokens=4"]
    first = cli(*train_args(tiny_data, run, *steps[1:], "max_steps=4"))
    assert first.returncode == 0, first.stderr[-2000:]
    store = Store(run)
    assert store.read_text("checkpoints/LATEST").strip() == "step-00000004"
    # corrupt the newest checkpoint's weights and remove the manifest of the one before
    store.write_bytes("checkpoints/step-00000004/model.pt", b"garbage")
    resumed = cli(*train_args(tiny_data, run, *steps))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping step-00000004" in resumed.stdout and "(step 2)" in resumed.stdout
    assert [r["step"] for r in [json.loads(x) for x in store.read_text("metrics.jsonl").splitlines()] if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert Checkpointer(run, 3, True).load_newest().step == 6
    store.remove("checkpoints/step-00000006/MANIFEST.json")
    assert Checkpointer(run, 3, True, log=lambda m: None).load_newest().step == 4


@pytest.mark.s3
def test_s3_writer_killed_mid_upload_leaves_a_loadable_run(s3_bucket):
    run = f"{s3_bucket}/runs/killed"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, run, "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Checkpointer(run, 2, False).load_newest() is None:
        time.sleep(0.5)
    time.sleep(random.Random(1).uniform(0.2, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = Checkpointer(run, 2, False, log=lambda m: None).load_newest()
    assert found is not None
    assert torch.equal(found.model["w"], torch.randn(256, 1024, generator=torch.Generator().manual_seed(found.step)))
