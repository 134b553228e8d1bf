"""Token shards on object storage (gpt_train/remote.py), against moto's S3 server: training from s3:// is the run
from a local copy, the cache keeps its bound, a shard replaced under a job or an unreachable bucket is one clear
error, and a fetch killed mid-write leaves nothing that a later read takes for a block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt_train import data, remote
from gpt_train.errors import DataError
from gpt_train.prepare import bundled_corpus, prepare
from helpers import REPO, cli, losses, one_line_error, tiny_data, train_args  # noqa: F401

pytestmark = pytest.mark.s3
SMALL_BLOCK = 4096  # a tiny split still spans many blocks


def upload(s3_server, local: str, url: str) -> str:
    fs = s3_server.fs()
    for path in Path(local).iterdir():
        fs.put_file(str(path), f"{url}/{path.name}")
    return url


@pytest.fixture
def s3_data(s3_server, s3_bucket, tiny_data) -> str:  # noqa: F811
    return upload(s3_server, tiny_data, f"{s3_bucket}/data")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(remote, "BLOCK_BYTES", SMALL_BLOCK)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_training_from_s3_gives_the_losses_of_a_local_copy(tmp_path, s3_data, tiny_data):  # noqa: F811
    steps = ["max_steps=6", "checkpoint.interval=3"]
    local = cli(*train_args(tiny_data, str(tmp_path / "local"), *steps))
    assert local.returncode == 0, local.stderr[-2000:]
    cache = tmp_path / "cache"
    on_s3 = cli(*train_args(s3_data, str(tmp_path / "s3"), *steps, f"data.cache_dir={cache}"))
    assert on_s3.returncode == 0, on_s3.stderr[-2000:]
    assert losses(tmp_path / "s3") == losses(tmp_path / "local") and len(losses(tmp_path / "local")) == 6
    val = [json.loads(line)["val_loss"] for run in ("local", "s3")
           for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert len(val) >= 2 and val[: len(val) // 2] == val[len(val) // 2 :]
    blocks = cache_files(cache)  # one block per shard: the tiny split is smaller than BLOCK_BYTES
    assert len(blocks) == 2 and not any(p.name.startswith(".tmp-") for p in blocks)


def test_llmc_shards_are_read_past_their_header(tmp_path, s3_server, s3_bucket, small_blocks):
    text = tmp_path / "corpus.txt"
    text.write_text(Path(bundled_corpus()).read_text()[:40_000])
    prepare([str(text)], str(tmp_path / "llmc"), val_fraction=0.1, shard_format="llmc")
    url = upload(s3_server, str(tmp_path / "llmc"), f"{s3_bucket}/llmc")
    cache = remote.Cache(str(tmp_path / "cache"), 1 << 30)
    local, far = data.Split(str(tmp_path / "llmc"), "train", 64), data.Split(url, "train", 64, cache=cache)
    assert far.num_windows == local.num_windows and far.tokens == local.tokens
    assert far.windows(range(far.num_windows)).equal(local.windows(range(local.num_windows)))


def test_npy_shards_are_read_past_their_header(tmp_path, s3_server, s3_bucket, small_blocks):
    """build-nanogpt's .npy shards, indexed locally and uploaded with their meta.json: each header is checked from
    a ranged read of the object, and the windows are those of the local files."""
    from gpt_train.prepare import index
    from gpt_train.tokenizer import gpt2

    local_dir = tmp_path / "npy"
    local_dir.mkdir()
    ids = np.array(gpt2().encode(Path(bundled_corpus()).read_text()[:40_000]), np.uint16)
    np.save(local_dir / "edufineweb_val_000000.npy", ids[:2_000])
    np.save(local_dir / "edufineweb_train_000001.npy", ids[2_000:6_000])
    np.save(local_dir / "edufineweb_train_000002.npy", ids[6_000:])
    index(str(local_dir))
    url = upload(s3_server, str(local_dir), f"{s3_bucket}/npy")
    cache = remote.Cache(str(tmp_path / "cache"), 1 << 30)
    for split in ("train", "val"):
        local, far = data.Split(str(local_dir), split, 64), data.Split(url, split, 64, cache=cache)
        assert far.num_windows == local.num_windows and far.tokens == local.tokens
        assert far.windows(range(far.num_windows)).equal(local.windows(range(local.num_windows)))


def test_the_cache_keeps_its_bound_and_evicted_blocks_are_fetched_again(tmp_path, monkeypatch, s3_data, tiny_data,  # noqa: F811
                                                                       small_blocks):
    root = tmp_path / "cache"
    cache = remote.Cache(str(root), 5 * SMALL_BLOCK)
    far, local = data.Split(s3_data, "train", 32, cache=cache), data.Split(tiny_data, "train", 32)
    fetched = []
    fetch = remote.RemoteShard._fetch
    monkeypatch.setattr(remote.RemoteShard, "_fetch", lambda shard, block: fetched.append(block) or fetch(shard, block))
    order = np.random.default_rng(0).permutation(far.num_windows)
    for rows in np.array_split(order, 40):
        assert far.windows(rows).equal(local.windows(rows))
        assert sum(p.stat().st_size for p in cache_files(root)) <= 5 * SMALL_BLOCK
    assert len(set(fetched)) > 20 and len(fetched) > 2 * len(set(fetched))  # evicted, then fetched again


def test_a_shard_replaced_under_a_running_job_is_a_clear_error(tmp_path, s3_server, s3_data, small_blocks):
    cache = remote.Cache(str(tmp_path / "cache"), 1 << 30)
    split = data.Split(s3_data, "train", 32, cache=cache)
    first = split.windows([0])
    name = json.loads(s3_server.fs().cat_file(f"{s3_data}/meta.json"))["splits"]["train"]["shards"][0]
    old = s3_server.fs().cat_file(f"{s3_data}/{name}")
    new = old[::-1]  # the same size, other ids: only the ETag tells
    s3_server.fs().pipe_file(f"{s3_data}/{name}", new)
    assert split.windows([0]).equal(first)  # cached already: what the job has read stays as it was
    with pytest.raises(DataError, match=f"shard '{s3_data}/{name}' changed while the job ran") as e:
        split.windows([split.num_windows - 1])  # a block not fetched yet
    message = str(e.value)
    assert f"{len(old):,} bytes" in message and "version" in message and "start a new run" in message
    # A new job on the replaced shard reads the new ids, not the blocks cached of the old one.
    again = data.Split(s3_data, "train", 32, cache=cache)
    assert again.window(0).tobytes() == new[: 33 * 2]


def test_missing_meta_shard_or_max_id_and_an_unreachable_bucket_are_clear_errors(tmp_path, s3_server, s3_bucket,
                                                                                 s3_data):
    cache = remote.Cache(str(tmp_path / "cache"), 1 << 30)
    with pytest.raises(DataError, match=f"missing {s3_bucket}/nothing/meta.json.*gpt-train prepare"):
        data.read_meta(f"{s3_bucket}/nothing")
    fs = s3_server.fs()
    meta = json.loads(fs.cat_file(f"{s3_data}/meta.json"))
    name = meta["splits"]["val"]["shards"][0]
    fs.rm(f"{s3_data}/{name}")
    with pytest.raises(DataError, match=f"shard '{s3_data}/{name}' listed in meta.json is missing: upload it"):
        data.Split(s3_data, "val", 32, cache=cache)
    del meta["splits"]["train"]["max_id"]
    fs.pipe_file(f"{s3_data}/meta.json", json.dumps(meta).encode())
    with pytest.raises(DataError, match="records no max_id of the 'train' split.*gpt-train prepare --force"):
        data.Split(s3_data, "train", 32, cache=cache)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    result = cli(*train_args("s3://no-such-bucket/data", str(tmp_path / "run")), env=env)
    one_line_error(result, "s3://no-such-bucket/data/meta.json", "check the URL and the credentials", "AWS_")


KILLED_WRITER = """
import os, signal, sys
from gpt_train import data, remote
remote.BLOCK_BYTES = 4096
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies with the block written, not yet renamed
data.Split(sys.argv[1], "train", 32, cache=remote.Cache(sys.argv[2], 1 << 30)).window(0)
"""


def test_a_fetch_killed_mid_write_leaves_nothing_a_later_read_uses(tmp_path, s3_data, tiny_data, small_blocks):  # noqa: F811
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, s3_data, str(root)], cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    left = cache_files(root)
    assert len(left) == 1 and left[0].name.startswith(".tmp-") and left[0].stat().st_size == SMALL_BLOCK
    left[0].write_bytes(b"\0" * SMALL_BLOCK)  # whatever it holds, it is never read as a block
    cache = remote.Cache(str(root), 1 << 30)
    far, local = data.Split(s3_data, "train", 32, cache=cache), data.Split(tiny_data, "train", 32)
    assert far.windows([0]).equal(local.windows([0]))
    block = next(p for p in cache_files(root) if not p.name.startswith(".tmp-"))
    block.write_bytes(block.read_bytes()[:100])  # a block cut short (a full disk, a hand edit) is fetched again
    assert far.windows([0]).equal(local.windows([0])) and block.stat().st_size == SMALL_BLOCK
    os.utime(left[0], (0, 0))  # a temporary file its writer left long ago goes at the next eviction
    far.windows([far.num_windows - 1])
    assert not left[0].exists()
