"""`status` reports only checkpoints that verify, names those that do not, and lists rolled-back ones."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from gpt_train import rundir
from gpt_train.status import read_run, summarize
from gpt_train.storage import Store
from helpers import cli, tiny_data, train_args  # noqa: F401


def test_status_skips_a_corrupt_final_checkpoint_and_lists_rolled_back_ones(tmp_path, tiny_data):
    run = tmp_path / "run"
    trained = cli(*train_args(tiny_data, str(run), "max_steps=6"))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-2000:]
    model = run / "checkpoints" / "step-00000006" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    (run / "rolled-back" / "step-00000005").mkdir(parents=True)  # as a rollback leaves it; contents not read

    result = cli("status", str(run), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout)
    assert r["checkpoint"]["step"] == 4 and r["checkpoint"]["final"] is False
    (bad,) = r["failed_checkpoints"]
    assert bad["step"] == 6 and bad["url"].endswith("checkpoints/step-00000006")
    assert "model.pt" in bad["reason"] and "corrupt" in bad["reason"]
    assert r["unverified_checkpoints"] == [2]  # older than the one that verified: not read
    assert [x["step"] for x in r["rolled_back"]] == [5] and r["rolled_back"][0]["url"].endswith("rolled-back/step-00000005")
    assert r["finished"] is False and r["state"] != "finished" and "step 4" in r["state"]

    text = cli("status", str(run))
    assert text.returncode == 0, text.stderr[-2000:]
    out = text.stdout
    assert "checkpoint: step 4 " in out and "finished:   no" in out and "state:      finished" not in out
    assert "step 6 does not verify:" in out and "model.pt" in out
    assert "not verified (older): step 2" in out and "rolled back: step 5" in out


def _folder(url: str, step: int, files: dict[str, bytes]) -> Store:
    """A checkpoint folder written the way the checkpointer writes one, without torch."""
    store = Store(url)
    folder = rundir.step_folder(step)
    for name, data in files.items():
        store.write_bytes(f"{folder}/{name}", data)
    manifest = {"format": rundir.FORMAT, "step": step,
                "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    store.write_text(f"{folder}/{rundir.MANIFEST}", json.dumps(manifest))
    return store


@pytest.fixture
def mem_run():
    url = f"memory://status/{random.getrandbits(64):x}"
    yield url
    Store(url).remove("")


@pytest.mark.parametrize("damage, reason", [
    (lambda s, f: None, None),
    (lambda s, f: s.write_text(f"{f}/MANIFEST.json", "{not json"), "MANIFEST.json' is not valid JSON"),
    (lambda s, f: s.write_text(f"{f}/MANIFEST.json", '{"format": "other/1"}'), "is not a gpt-train checkpoint"),
    (lambda s, f: s.write_text(f"{f}/MANIFEST.json", json.dumps({"format": rundir.FORMAT})),
     "does not list the checkpoint's files"),
    (lambda s, f: s.remove(f"{f}/model.pt"), "model.pt' is listed in the manifest but missing"),
    (lambda s, f: s.write_bytes(f"{f}/model.pt", b"weights!"), "model.pt' does not match its manifest"),  # same size
    (lambda s, f: s.write_bytes(f"{f}/meta.json", b"{}"), "meta.json' does not match its manifest"),
])
def test_verify_says_why_a_checkpoint_does_not_load(mem_run, damage, reason):
    store = _folder(mem_run, 3, {"model.pt": b"weights.", "meta.json": b'{"step": 3}'})
    damage(store, rundir.step_folder(3))
    why = rundir.verify(store, 3)
    assert why is None if reason is None else reason in (why or "")


def test_status_without_any_checkpoint_that_verifies(mem_run):
    store = _folder(mem_run, 2, {"model.pt": b"two", "meta.json": b'{"step": 2}'})
    _folder(mem_run, 4, {"model.pt": b"four", "meta.json": b'{"step": 4, "final": true}'})
    store.write_bytes(f"{rundir.step_folder(4)}/model.pt", b"FOUR")
    store.write_bytes(f"{rundir.step_folder(2)}/model.pt", b"TWO")
    store.write_text("config.yaml", "train:\n  max_steps: 4\n")
    store.write_text("events.jsonl", "".join(json.dumps(e) + "\n" for e in [
        {"event": "start", "time": 1.0, "step": 0}, {"event": "finish", "time": 2.0, "step": 4}]))
    r = summarize(read_run(mem_run), now=3.0)
    assert r["checkpoint"] is None and [x["step"] for x in r["failed_checkpoints"]] == [4, 2]
    assert r["unverified_checkpoints"] == [] and r["rolled_back"] == []
    assert r["finished"] is False and "no checkpoint verifies" in r["state"]


def test_a_verified_final_checkpoint_is_finished(mem_run):
    store = _folder(mem_run, 4, {"model.pt": b"four", "meta.json": b'{"step": 4, "final": true}'})
    store.write_text("config.yaml", "train:\n  max_steps: 4\n")
    store.write_text("events.jsonl", "".join(json.dumps(e) + "\n" for e in [
        {"event": "start", "time": 1.0, "step": 0}, {"event": "finish", "time": 2.0, "step": 4}]))
    r = summarize(read_run(mem_run), now=3.0)
    assert r["finished"] is True and r["state"] == "finished" and r["failed_checkpoints"] == []
    assert r["checkpoint"]["step"] == 4 and r["checkpoint"]["final"] is True


def test_listing_needs_no_checkpoint_to_exist(tmp_path):
    Path(tmp_path, "events.jsonl").write_text('{"event": "start", "time": 1, "step": 0}\n')
    r = summarize(read_run(str(tmp_path)), now=2.0)
    assert (r["checkpoint"], r["failed_checkpoints"], r["unverified_checkpoints"], r["rolled_back"]) == (None, [], [], [])
