import numpy as np
import pytest
import torch

from gpt_train import data
from gpt_train.errors import DataError
from helpers import tiny_data  # noqa: F401


def batch_rows(split, seed, global_batch, micro, world, steps):
    """Every sequence each step uses, in global order, gathered from all ranks."""
    loaders = [data.Loader(data.Shuffled(split, seed), global_batch, micro, r, world) for r in range(world)]
    out = []
    for _ in range(steps):
        rows = []
        for loader in loaders:
            rows += [x for x, _ in loader.next_batch()]
        out.append(torch.cat(rows))
    return out


def test_token_stream_does_not_depend_on_rank_count(tiny_data):
    split = data.Split(tiny_data, "train", 16)
    one = batch_rows(split, 7, global_batch=8, micro=4, world=1, steps=5)
    two = batch_rows(split, 7, global_batch=8, micro=2, world=2, steps=5)
    four = batch_rows(split, 7, global_batch=8, micro=1, world=4, steps=5)
    for a, b, c in zip(one, two, four):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_targets_are_inputs_shifted_and_position_is_the_whole_state(tiny_data):
    split = data.Split(tiny_data, "train", 16)
    loader = data.Loader(data.Shuffled(split, 1), 8, 4, 0, 1)
    (x, y), _ = loader.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for _ in range(3):
        loader.next_batch()
    expected = loader.next_batch()
    resumed = data.Loader(data.Shuffled(split, 1), 8, 4, 0, 1)
    resumed.next_sample = 4 * 8
    for (a, b), (c, d) in zip(expected, resumed.next_batch()):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_epochs_visit_every_window_once(tiny_data):
    split = data.Split(tiny_data, "train", 16)
    stream = data.Shuffled(split, 3)
    seen = [stream.window_of(k) for k in range(split.num_windows)]
    assert sorted(seen) == list(range(split.num_windows))
    assert seen != [stream.window_of(k) for k in range(split.num_windows, 2 * split.num_windows)]


def test_eval_batches_are_fixed_and_split_over_ranks(tiny_data):
    split = data.Split(tiny_data, "val", 16)
    single = torch.cat([x for x, _ in data.eval_batches(split, 2, 4, 0, 1)])
    parts = [torch.cat([x for x, _ in data.eval_batches(split, 2, 4, r, 2)]) for r in range(2)]
    assert len(single) == 8 and sum(len(p) for p in parts) == 8
    assert sorted(map(tuple, single.tolist())) == sorted(map(tuple, torch.cat(parts).tolist()))


def test_missing_and_broken_data_are_clear_errors(tmp_path, tiny_data):
    with pytest.raises(DataError, match="no prepared data in .* run `gpt-train prepare"):
        data.read_meta(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="fewer than one sequence"):
        data.Split(tiny_data, "val", 10**7 // 2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text('{"format": "gpt-train-tokens/1", "dtype": "uint16", "tokenizer": {"n_vocab": 50257}, '
                                      '"splits": {"train": {"shards": ["train-00000.bin"], "tokens": 3}}}')
    with pytest.raises(DataError, match="is missing"):
        data.Split(str(broken), "train", 4)
    np.zeros(3, dtype=np.uint8).tofile(broken / "train-00000.bin")
    with pytest.raises(DataError, match="truncated"):
        data.Split(str(broken), "train", 4)


def test_a_shard_shorter_than_meta_says_is_an_error_at_start(tmp_path, tiny_data):
    import shutil

    from gpt_train.data import Split
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "train-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2 * 1000)  # 1,000 uint16 tokens gone, still whole tokens
    with pytest.raises(DataError, match=r"hold 47,587 tokens but meta.json says 48,587: a shard was cut short"):
        Split(str(data), "train", 32)


def test_prefetching_reads_ahead_without_moving_the_position(tiny_data):
    split = data.Split(tiny_data, "train", 32)
    plain = data.Loader(data.Shuffled(split, 7), 16, 4, 0, 1)
    ahead = data.Loader(data.Shuffled(split, 7), 16, 4, 0, 1, prefetch=True)
    for _ in range(5):
        assert all(torch.equal(a, b) for pa, pb in zip(plain.next_batch(), ahead.next_batch()) for a, b in zip(pa, pb))
        assert ahead.state_dict() == plain.state_dict()  # the batch read ahead is not counted as consumed
    resumed = data.Loader(data.Shuffled(split, 7), 16, 4, 0, 1, prefetch=True)
    resumed.next_batch()  # reads ahead from position 16
    resumed.load_state_dict(ahead.state_dict())  # somewhere else: what was read ahead must not be used
    assert all(torch.equal(a, b) for pa, pb in zip(plain.next_batch(), resumed.next_batch()) for a, b in zip(pa, pb))


def test_bits_per_byte(tmp_path, tiny_data):
    meta = data.read_meta(tiny_data)
    val = meta["splits"]["val"]
    assert val["text_bytes"] > 0
    assert data.bits_per_byte(2.0, meta) == pytest.approx(2.0 / np.log(2) * val["tokens"] / val["text_bytes"])
    train = meta["splits"]["train"]
    assert data.bits_per_byte(2.0, meta, "train") == pytest.approx(2.0 / np.log(2) * train["tokens"] / train["text_bytes"])
    assert data.bits_per_byte(2.0, {"splits": {"val": {"tokens": 10, "text_bytes": 0}}}) is None
    assert data.bits_per_byte(2.0, meta, "test") is None


def test_data_prepared_before_formats_and_bytes_were_recorded_still_loads(tmp_path, tiny_data):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_data, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["shard_format"], meta["header_bytes"]
    for info in meta["splits"].values():
        del info["text_bytes"]
    (old / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        a, b = data.Split(tiny_data, split, 32), data.Split(str(old), split, 32)
        assert a.num_windows == b.num_windows and torch.equal(a.windows(range(a.num_windows)), b.windows(range(b.num_windows)))
    assert data.bits_per_byte(2.0, data.read_meta(str(old))) is None
    assert data.fingerprint(data.read_meta(str(old))) == data.fingerprint(data.read_meta(tiny_data))
    with pytest.raises(DataError, match="describes gpt-train token files, but data.format is llmc"):
        data.read_meta(str(old), "llmc")
