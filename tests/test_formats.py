"""Token files of other tools: llm.c's shards, nanoGPT's train.bin/val.bin and build-nanogpt's .npy shards, read in
place, written (llm.c's) by `prepare --format llmc`, each header check one line, and the fingerprint of what lies
there."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpt_train import data, formats
from gpt_train import prepare as P
from gpt_train import tokenizer as T
from gpt_train.errors import DataError
from helpers import cli, losses, one_line_error, read_metrics, tiny_data, train_args  # noqa: F401

# llm.c's dev/data/data_common.py: 256 int32, magic and version per token type, the token count, zeros.
LLMC = {np.uint16: (20240520, 1), np.uint32: (20240801, 7)}


def write_datafile(path: Path, ids, dtype=np.uint16, magic=None, version=None, count=None) -> None:
    """A shard as llm.c's write_datafile writes it; magic, version and count overridable to break it."""
    header = np.zeros(256, dtype=np.int32)
    header[0] = LLMC[dtype][0] if magic is None else magic
    header[1] = LLMC[dtype][1] if version is None else version
    header[2] = len(ids) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(ids, dtype=dtype).tobytes())


def read_datafile(path: Path) -> np.ndarray:
    """An llm.c shard read from the published layout alone, as llm.c's dataloader checks it."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    dtype = {magic: dtype for dtype, (magic, _) in LLMC.items()}[int(header[0])]
    assert header[1] == LLMC[dtype][1] and not header[3:].any()
    tokens = np.frombuffer(raw[1024:], dtype=dtype)
    assert len(tokens) == header[2]
    return tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "book.txt"
    path.write_text(Path(P.bundled_corpus()).read_text(encoding="utf-8")[:60_000] + " café 🐋", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> dict[str, Path]:
    """The corpus prepared in both formats, 3,000 tokens per shard (so several shards, a partial last one)."""
    root = tmp_path_factory.mktemp("prepared")
    for shard_format in (formats.NATIVE, formats.LLMC):
        P.prepare([str(corpus)], str(root / shard_format), val_fraction=0.1, shard_tokens=3000,
                  shard_format=shard_format)
    return {name: root / name for name in (formats.NATIVE, formats.LLMC)}


def token_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def all_windows(split: data.Split) -> np.ndarray:
    return split.windows(range(split.num_windows)).numpy()


def test_llmc_shards_hold_the_texts_tokens_under_llmcs_header_layout(prepared, corpus):
    meta = json.loads((prepared["llmc"] / "meta.json").read_text())
    assert meta["shard_format"] == "llmc" and meta["header_bytes"] == 1024 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["shards"][:2] == ["data_train_000000.bin", "data_train_000001.bin"]
    assert meta["splits"]["val"]["shards"] == ["data_val_000000.bin"]
    ids = [read_datafile(prepared["llmc"] / name) for split in ("train", "val") for name in meta["splits"][split]["shards"]]
    assert all(len(shard) <= 3000 for shard in ids)
    text = corpus.read_text(encoding="utf-8")
    tok = T.gpt2()
    assert np.concatenate(ids).tolist() == tok.encode(text) + [tok.eot]  # val: the tail, cut from train's last shard
    # the bytes of text, recorded for bits per byte, add up to the corpus's, in both formats alike
    native = json.loads((prepared["gpt-train"] / "meta.json").read_text())
    for m in (meta, native):
        assert m["splits"]["train"]["text_bytes"] + m["splits"]["val"]["text_bytes"] == len(text.encode("utf-8"))
        assert m["splits"]["val"]["text_bytes"] > 0
    assert {k: v["text_bytes"] for k, v in meta["splits"].items()} == {k: v["text_bytes"] for k, v in native["splits"].items()}


def test_training_reads_llmc_shards_as_it_reads_its_own(prepared, tmp_path):
    # our llm.c shards with the meta.json prepare wrote; the same files indexed; the same files with no meta.json
    indexed, bare = tmp_path / "indexed", tmp_path / "bare"
    for directory in (indexed, bare):
        directory.mkdir()
        for path in prepared["llmc"].glob("*.bin"):
            shutil.copy(path, directory)
    result = cli("prepare", "--index", str(indexed))
    assert result.returncode == 0, result.stderr
    assert "indexed" in result.stdout and "llmc files" in result.stdout and "left the token files" in result.stdout
    assert token_files(indexed) == token_files(prepared["llmc"])  # not rewritten
    assert sorted(p.name for p in indexed.iterdir()) == sorted([*token_files(indexed), "meta.json"])
    meta = json.loads((indexed / "meta.json").read_text())
    ours = json.loads((prepared["llmc"] / "meta.json").read_text())
    assert meta["tokenizer"] == T.gpt2().identity() and meta["shard_format"] == "llmc" and meta["header_bytes"] == 1024
    for split in ("train", "val"):
        # counted by decoding the ids, the bytes of text are what prepare counted from the text
        for key in ("shards", "tokens", "text_bytes"):
            assert meta["splits"][split][key] == ours["splits"][split][key], key
        # prepare's is a bound: the largest id written, even where it went on with the tail to val (<|endoftext|>)
        assert meta["splits"][split]["max_id"] <= ours["splits"][split]["max_id"]
        native = all_windows(data.Split(str(prepared["gpt-train"]), split, 64))
        for directory in (prepared["llmc"], indexed, bare):
            assert np.array_equal(all_windows(data.Split(str(directory), split, 64)), native)
    # read without meta.json, the description is the index's but for what takes a full read
    described = data.read_meta(str(bare))
    assert data.fingerprint(described) == data.fingerprint(meta)
    assert data.bits_per_byte(2.0, described) is None and data.bits_per_byte(2.0, meta) > 0
    again = cli("prepare", "--index", str(indexed))
    assert again.returncode == 0 and "indexed already" in again.stdout
    refused = cli("prepare", "--index", str(prepared["llmc"]))  # a meta.json written from text stays
    one_line_error(refused, "was written by `gpt-train prepare` from text", "--force")


def test_llmc_version_7_holds_uint32_ids(tmp_path):
    writer = P._ShardWriter(tmp_path, "train", np.dtype(np.uint32), 5, "llmc", np.ones(70_000, np.int64))
    writer.write(np.array([1, 2, 65_536, 69_999, 5, 6, 7], np.uint32))
    writer.close()
    shards = [read_datafile(tmp_path / name) for name in writer.shards]
    assert [s.dtype for s in shards] == [np.uint32] * 2 and np.concatenate(shards).tolist() == [1, 2, 65_536, 69_999, 5, 6, 7]
    assert writer.text_bytes == 7
    # llm.c's own version-7 shards (GPT-2 ids here) index as uint32
    llmc = tmp_path / "v7"
    llmc.mkdir()
    ids = np.arange(1000) % 50_000
    write_datafile(llmc / "x_train_000001.bin", ids[:700], np.uint32)
    write_datafile(llmc / "x_val_000000.bin", ids[700:], np.uint32)
    meta = P.index(str(llmc))
    assert meta["dtype"] == "uint32" and meta["splits"]["train"]["tokens"] == 700 and meta["splits"]["val"]["max_id"] == 999
    assert data.Split(str(llmc), "train", 99).window(1).tolist() == ids[99:199].tolist()


def test_nanogpt_train_bin_and_val_bin(tmp_path):
    tok = T.gpt2()
    texts = {"train": Path(P.bundled_corpus()).read_text(encoding="utf-8")[:20_000], "val": "The whale, the sea. " * 50}
    ids = {split: np.array(tok.encode(text) + [tok.eot], np.uint16) for split, text in texts.items()}
    for split, array in ids.items():
        array.tofile(tmp_path / f"{split}.bin")  # as nanoGPT's data/openwebtext/prepare.py writes them
    (tmp_path / "README").write_text("not a token file")
    assert formats.detect(tmp_path) == "nanogpt"
    meta = P.index(str(tmp_path))
    assert meta["shard_format"] == "nanogpt" and meta["header_bytes"] == 0 and meta["dtype"] == "uint16"
    for split, text in texts.items():
        info = meta["splits"][split]
        assert info["shards"] == [f"{split}.bin"] and info["tokens"] == len(ids[split])
        assert info["text_bytes"] == len(text.encode("utf-8")) and info["max_id"] == tok.eot
        split_data = data.Split(str(tmp_path), split, 32)
        assert split_data.window(3).tolist() == ids[split][96:129].tolist()
    assert data.bits_per_byte(1.0, meta) == pytest.approx(len(ids["val"]) / len(texts["val"]) / np.log(2))
    assert P.index(str(tmp_path), "nanogpt") == meta  # declared, it is the same
    with pytest.raises(DataError, match="describes nanogpt token files, but data.format is llmc"):
        data.read_meta(str(tmp_path), "llmc")
    with pytest.raises(DataError, match=r"has no \*_train_\*\.bin and no \*_val_\*\.bin \(llmc files\)"):
        data.read_meta(str(tmp_path / "elsewhere"), "llmc")
    (tmp_path / "meta.pkl").write_bytes(b"")  # nanoGPT's character-level datasets
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="holds nanoGPT's meta.pkl, so its ids are of a character vocabulary"):
        P.index(str(tmp_path))
    (tmp_path / "meta.pkl").unlink()
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"val\.bin' is truncated \(size not a multiple of 2 bytes\)"):
        P.index(str(tmp_path))


@pytest.mark.parametrize("make, message", [
    (lambda p: write_datafile(p, range(10), magic=20240521),
     "fineweb_train_000001.bin: magic number 20240521 is not llm.c's (20240520 for uint16, 20240801 for uint32 tokens)"),
    (lambda p: write_datafile(p, range(10), version=2),
     "fineweb_train_000001.bin: version 2 with magic 20240520; llm.c writes version 1 with it (uint16 tokens)"),
    (lambda p: write_datafile(p, range(10), np.uint32, version=1),
     "fineweb_train_000001.bin: version 1 with magic 20240801; llm.c writes version 7 with it (uint32 tokens)"),
    (lambda p: write_datafile(p, range(10), count=11),
     "fineweb_train_000001.bin: header says 11 tokens (22 bytes) but the file holds 20 bytes after its 1024-byte header"),
    (lambda p: write_datafile(p, range(10), count=-1),
     "fineweb_train_000001.bin: header says -1 tokens"),
    (lambda p: p.write_bytes(np.zeros(10, np.int32).tobytes()),
     "fineweb_train_000001.bin: 40 bytes, shorter than llm.c's 1024-byte header"),
    (lambda p: np.arange(600, dtype=np.uint16).tofile(p),  # headerless, named as an llm.c shard
     "fineweb_train_000001.bin: magic number 65536 is not llm.c's"),
], ids=["magic", "version", "version-7", "count", "negative-count", "short", "no-header"])
def test_each_llmc_header_check_says_what_failed(tmp_path, make, message):
    write_datafile(tmp_path / "fineweb_val_000000.bin", range(100))
    make(tmp_path / "fineweb_train_000001.bin")
    with pytest.raises(DataError) as raised:
        P.index(str(tmp_path))
    assert str(raised.value).startswith(f"{tmp_path}/{message}")
    with pytest.raises(DataError, match="fineweb_train_000001.bin"):
        data.Split(str(tmp_path), "train", 4)  # training without meta.json checks the same
    one_line_error(cli("prepare", "--index", str(tmp_path)), message)


def test_a_shard_cut_short_is_named_with_its_sizes(tmp_path):
    """The full-size case: a 100M-token shard two bytes short (a sparse file: no 200 MB written)."""
    shard = tmp_path / "fineweb_train_000001.bin"
    write_datafile(shard, [], count=100_000_000)
    with open(shard, "r+b") as f:
        f.truncate(1024 + 199_999_998)
    with pytest.raises(DataError) as raised:
        formats.count_tokens(shard, "llmc", np.dtype(np.uint16))
    assert str(raised.value) == (f"{shard}: header says 100000000 tokens (200000000 bytes) but the file holds "
                                 "199999998 bytes after its 1024-byte header")


def test_a_shard_replaced_after_indexing_is_refused_at_start(tmp_path):
    write_datafile(tmp_path / "x_train_000000.bin", range(300))
    write_datafile(tmp_path / "x_val_000000.bin", range(100))
    P.index(str(tmp_path))
    write_datafile(tmp_path / "x_train_000000.bin", range(200))
    with pytest.raises(DataError, match="hold 200 tokens but meta.json says 300"):
        data.Split(str(tmp_path), "train", 4)
    write_datafile(tmp_path / "x_train_000000.bin", range(300), np.uint32)
    with pytest.raises(DataError, match="x_train_000000.bin holds uint32 tokens but meta.json says uint16"):
        data.Split(str(tmp_path), "train", 4)


def test_directories_that_do_not_add_up(tmp_path):
    write_datafile(tmp_path / "x_train_000000.bin", range(300))
    with pytest.raises(DataError, match=r"has no \*_val_\*\.bin \(llmc files\): training needs a train and a val"):
        P.index(str(tmp_path))
    write_datafile(tmp_path / "x_val_000000.bin", range(100), np.uint32)
    with pytest.raises(DataError, match=r"mixes uint16 ids \(x_train_000000.bin\) and uint32 ids \(x_val_000000.bin\)"):
        P.index(str(tmp_path))
    write_datafile(tmp_path / "x_val_000000.bin", [50_257] * 10)
    with pytest.raises(DataError, match="x_val_000000.bin holds token id 50257, outside the 50257 ids of tokenizer 'gpt2'"):
        P.index(str(tmp_path))
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(DataError, match=r"no prepared data in .*or `gpt-train prepare --index"):
        data.read_meta(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="holds no llm.c shards"):
        P.index(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no prepared data in"):
        data.read_meta(str(tmp_path), "gpt-train")  # gpt-train's own shards come with their meta.json


def test_fingerprint_follows_the_files(tmp_path, tiny_data, capsys):
    write_datafile(tmp_path / "x_train_000000.bin", np.arange(100_000) % 50_000)
    write_datafile(tmp_path / "x_val_000000.bin", range(100))
    first = data.fingerprint(P.index(str(tmp_path)))
    assert data.fingerprint(data.read_meta(str(tmp_path))) == first
    ids = np.arange(100_000) % 50_000
    ids[10] = 7  # one token, same size
    write_datafile(tmp_path / "x_train_000000.bin", ids)
    changed = data.fingerprint(formats.describe(tmp_path, "llmc"))
    assert changed != first
    P.index(str(tmp_path))
    assert "indexed already" not in capsys.readouterr().out  # read again: meta.json follows the files
    assert data.fingerprint(data.read_meta(str(tmp_path))) == changed
    write_datafile(tmp_path / "x_train_000001.bin", range(10))  # a shard more
    assert data.fingerprint(formats.describe(tmp_path, "llmc")) not in (first, changed)
    # gpt-train's own data keeps the fingerprint it had before meta.json recorded formats and bytes
    meta = data.read_meta(tiny_data)
    old = {k: v for k, v in meta.items() if k not in ("shard_format", "header_bytes")}
    old["splits"] = {name: {k: v for k, v in info.items() if k != "text_bytes"} for name, info in meta["splits"].items()}
    assert data.fingerprint(old) == data.fingerprint(meta)


def test_command_line_modes(tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text("Hello world. " * 100)
    for args, message in [
        (["--index", str(tmp_path), str(corpus)], "--index DIR reads the token files in DIR: give it no INPUT"),
        ([str(corpus)], "give INPUT... and --out DIR (or --index DIR"),
        ([str(corpus), "--out", str(tmp_path / "o"), "--format", "nanogpt"], "--format nanogpt is not written"),
        (["--index", str(tmp_path), "--format", "gpt-train"], "--index reads llmc, nanogpt or npy token files"),
        ([str(corpus), "--out", str(tmp_path / "o"), "--format", "llmc", "--shard-tokens", str(2**31)],
         "does not fit llm.c's header"),
    ]:
        one_line_error(cli("prepare", *args), message)
    out = tmp_path / "out"
    assert cli("prepare", str(corpus), "--out", str(out), "--format", "llmc").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["data_train_000000.bin", "data_val_000000.bin", "meta.json"]
    write_datafile(out / "fineweb_train_000001.bin", range(10))  # llm.c's own, beside ours: never deleted
    result = cli("prepare", str(corpus), "--out", str(out))  # the same input in the other format replaces ours
    assert result.returncode == 0 and "gpt-train shards" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000001.bin", "meta.json", "train-00000.bin",
                                                     "val-00000.bin"]
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    write_datafile(indexed / "x_train.bin", range(300))
    write_datafile(indexed / "x_val.bin", range(100))
    assert cli("prepare", "--index", str(indexed)).returncode == 0
    one_line_error(cli("prepare", str(corpus), "--out", str(indexed)), "holds indexed llmc token files: pass --force")


def test_training_runs_on_llmc_shards_in_place(prepared, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in prepared["llmc"].glob("*.bin"):
        shutil.copy(path, bare)
    result = cli(*train_args(str(bare), str(tmp_path / "run"), "max_steps=2", "eval_interval=2"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert sorted(p.name for p in bare.iterdir()) == sorted(token_files(prepared["llmc"]))  # no meta.json written
    assert any("val_loss" in record for record in read_metrics(tmp_path / "run"))


# -- build-nanogpt's .npy shards --------------------------------------------------------------------------------

def write_npy_shards(root: Path, ids: np.ndarray, per_shard: int) -> None:
    """As build-nanogpt's fineweb.py writes them: np.save of uint16 arrays, the first shard val, the others train."""
    root.mkdir(exist_ok=True)
    for index, start in enumerate(range(0, len(ids), per_shard)):
        split = "val" if index == 0 else "train"
        np.save(root / f"edufineweb_{split}_{index:06d}", ids[start:start + per_shard].astype(np.uint16))


def test_build_nanogpt_npy_shards_train_as_the_same_ids_in_llmc_shards(tmp_path):
    """The same GPT-2 ids in the same shards, as build-nanogpt's .npy files and as llm.c's: read in place without
    a meta.json, the same windows, a run on each with the same loss at every step, then indexed."""
    tok = T.gpt2()
    ids = np.array(tok.encode(Path(P.bundled_corpus()).read_text(encoding="utf-8")[:60_000]), np.uint16)
    npy, bins = tmp_path / "npy", tmp_path / "bin"
    write_npy_shards(npy, ids, 5_000)
    bins.mkdir()
    for path in npy.iterdir():
        write_datafile(bins / path.name.replace(".npy", ".bin"), np.load(path))
    shards = sorted(p.name for p in npy.iterdir())
    assert formats.detect(npy) == "npy" and len(shards) == -(-len(ids) // 5_000) >= 3
    for split in ("val", "train"):
        assert np.array_equal(all_windows(data.Split(str(npy), split, 64)), all_windows(data.Split(str(bins), split, 64)))
    assert data.Split(str(npy), "val", 64).window(2).tolist() == ids[128:193].tolist()
    runs = {}
    for name, root in (("npy", npy), ("bin", bins)):
        result = cli(*train_args(str(root), str(tmp_path / f"run-{name}"), "max_steps=3"))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        runs[name] = losses(tmp_path / f"run-{name}")
    assert runs["npy"] == runs["bin"] and len(runs["npy"]) == 3
    assert sorted(p.name for p in npy.iterdir()) == shards  # read in place: nothing written next to them
    meta = P.index(str(npy))
    assert (meta["shard_format"], meta["header_bytes"], meta["dtype"]) == ("npy", 128, "uint16")
    assert meta["splits"]["train"]["shards"] == shards[:-1] and meta["splits"]["val"]["shards"] == shards[-1:]  # val_0
    assert meta["splits"]["train"]["tokens"] == len(ids) - 5_000
    assert meta["splits"]["val"]["text_bytes"] == len(tok.decode(ids[:5_000].tolist()).encode("utf-8"))
    assert data.read_meta(str(npy))["splits"] == meta["splits"]  # now from meta.json


def _npy_with(path: Path, array: np.ndarray, version=None) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.arange(10, dtype=np.float32)),
     "holds an array of <f4 and shape (10,); gpt-train reads 1-D arrays of <u2 or <u4"),
    (lambda p: np.save(p, np.arange(10, dtype=np.uint16).reshape(2, 5)),
     "holds an array of <u2 and shape (2, 5)"),
    (lambda p: _npy_with(p, np.arange(10, dtype=np.uint16), version=(2, 0)),
     "a .npy header of version 2.0"),
    (lambda p: (np.save(p, np.arange(10, dtype=np.uint16)), p.write_bytes(p.read_bytes()[:-2])),
     "its header says 10 tokens (20 bytes) but the file holds 18 bytes after its 128-byte header"),
    (lambda p: np.arange(600, dtype=np.uint16).tofile(p),  # no header at all
     "not a .npy file of token ids (no numpy magic in its first 128 bytes)"),
], ids=["float", "2-d", "version-2", "short", "no-header"])
def test_each_npy_header_check_says_what_failed(tmp_path, make, message):
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(100, dtype=np.uint16))
    make(tmp_path / "edufineweb_train_000001.npy")
    with pytest.raises(DataError) as raised:
        P.index(str(tmp_path))
    assert str(raised.value).startswith(f"{tmp_path}/edufineweb_train_000001.npy: {message}"), raised.value
    one_line_error(cli("prepare", "--index", str(tmp_path)), message)
