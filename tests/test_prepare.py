"""`gpt-train prepare`: shards that decode back to the inputs, every input format, skipping work already done."""

import argparse
import gzip
import importlib
import io
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from gpt_train import prepare as P
from gpt_train import tokenizer as T
from gpt_train.errors import DataError
from helpers import cli

EOT = "<|endoftext|>"


def read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    shards = [np.memmap(out / name, dtype=meta["dtype"], mode="r") for name in meta["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.array([], dtype=meta["dtype"])


def decode_all(out: Path, tok: T.Tokenizer) -> str:
    """Both splits, train first, with <|endoftext|> spelled out."""
    return "".join(tok.decode(read_split(out, split)) for split in ("train", "val"))


def docs_of(out: Path, split: str, tok: T.Tokenizer) -> list[str]:
    text = tok.decode(read_split(out, split))
    assert text.endswith(EOT)
    return text.split(EOT)[:-1]


def write_jsonl(path: Path, texts: list[str]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))


def test_bundled_corpus_decodes_back_exactly(tmp_path):
    text = Path(P.bundled_corpus()).read_text(encoding="utf-8")
    meta = P.prepare([P.bundled_corpus()], str(tmp_path), shard_tokens=100_000)
    tok = T.gpt2()
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == "gpt-train-tokens/1" and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == tok.identity()
    modified = str(os.stat(P.bundled_corpus()).st_mtime)
    assert meta["sources"] == [{"path": P.bundled_corpus(), "bytes": 1204997, "modified": modified}]
    # One document, so val is the tail of the stream: 0.5% of it, never empty.
    assert meta["val_from"] == "tail"
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["shards"] == [f"train-{i:05d}.bin" for i in range(4)] and val["shards"] == ["val-00000.bin"]
    assert val["tokens"] == np.ceil(0.005 * (train["tokens"] + val["tokens"]))
    ids = np.concatenate([read_split(tmp_path, "train"), read_split(tmp_path, "val")])
    assert len(ids) == train["tokens"] + val["tokens"]
    assert ids.tolist() == tok.encode(text) + [tok.eot]  # pieces encoded apart give the ids of the whole
    assert meta["shard_format"] == "gpt-train" and meta["header_bytes"] == 0
    assert train["text_bytes"] + val["text_bytes"] == len(text.encode("utf-8"))  # for bits per byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", *train["shards"], *val["shards"]]


def test_cutting_long_documents_keeps_ids_exact(monkeypatch):
    monkeypatch.setattr(P, "BLOCK_CHARS", 300)
    book = Path(P.bundled_corpus()).read_text(encoding="utf-8")[:20_000]
    parts = ["word", "Word", " ", "  ", "\n", "\n\n", "\r\n", "\t", "'s", "'ll", "123", "4567", ".", "!!", "—", "é",
             "e\u0301", "世界", "🎉", " x", "ß", "\xa0", "\u2028", "'", "(", "Ω", "_", "²", "<|endoftext|>"]
    rng = random.Random(0)
    texts = [book] + ["".join(rng.choices(parts, k=rng.randint(100, 2000))) for _ in range(30)]
    for tok in (T.gpt2(), T.train_bpe([book], 400)):  # GPT-2's split pattern and rustbpe's (GPT-4's)
        for text in texts:
            pieces = list(P._pieces(P._line_blocks(io.StringIO(text))))
            assert "".join(pieces) == text
            assert [i for piece in pieces for i in tok.encode(piece)] == tok.encode(text)


def test_output_does_not_depend_on_workers_or_how_they_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "BLOCK_CHARS", 20_000)
    monkeypatch.setattr(P, "ITEM_CHARS", 20_000)
    corpus = tmp_path / "in.txt"
    corpus.write_text(Path(P.bundled_corpus()).read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    P.prepare([str(corpus)], str(tmp_path / "w1"), workers=1)
    assert "1 worker)" in capsys.readouterr().out
    idle = threading.Event()
    other = threading.Thread(target=idle.wait)  # a thread in this process: forking could deadlock the workers
    other.start()
    try:
        P.prepare([str(corpus)], str(tmp_path / "spawned"), workers=2)
    finally:
        idle.set()
        other.join()
    assert "2 worker processes, spawned)" in capsys.readouterr().out
    # a fresh process has one thread: its workers are forked (the bundled book twice is 3 tasks of 1 MB)
    corpus.write_text(Path(P.bundled_corpus()).read_text(encoding="utf-8") * 2, encoding="utf-8")
    forked = cli("prepare", str(corpus), "--out", str(tmp_path / "forked"), "--workers", "2")
    assert forked.returncode == 0 and "2 worker processes, forked)" in forked.stdout, forked.stdout + forked.stderr
    monkeypatch.undo()
    P.prepare([str(corpus)], str(tmp_path / "forked-w1"), workers=1)
    for split in ("train", "val"):
        shard = f"{split}-00000.bin"
        assert (tmp_path / "w1" / shard).read_bytes() == (tmp_path / "spawned" / shard).read_bytes()
        assert (tmp_path / "forked-w1" / shard).read_bytes() == (tmp_path / "forked" / shard).read_bytes()


def test_a_worker_that_dies_is_a_clear_error_and_keeps_the_previous_output(tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text(Path(P.bundled_corpus()).read_text(encoding="utf-8") * 2, encoding="utf-8")
    out = tmp_path / "out"
    assert cli("prepare", str(corpus), "--out", str(out), "--workers", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    corpus.write_text(corpus.read_text(encoding="utf-8") + "changed", encoding="utf-8")
    # as the kernel's OOM killer would: the forked workers end without a word
    script = ("import os, sys; from gpt_train import cli, tokenizer; "
              "tokenizer.Tokenizer.encode_array = lambda *a: os._exit(9); sys.exit(cli.main())")
    result = subprocess.run([sys.executable, "-c", script, "prepare", str(corpus), "--out", str(out), "--workers", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "an encoding worker process died" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_every_200th_document_is_validation(tmp_path):
    texts = [f"Document number {i}." for i in range(400)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    meta = P.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "out"))
    tok = T.gpt2()
    assert meta["val_from"] == "documents"
    assert docs_of(tmp_path / "out", "val", tok) == [texts[199], texts[399]]
    assert docs_of(tmp_path / "out", "train", tok) == [t for i, t in enumerate(texts) if i not in (199, 399)]
    assert meta["splits"]["val"]["text_bytes"] == len((texts[199] + texts[399]).encode())


def test_jsonl_gz_json_gz_text_and_globs(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl.gz", ["alpha one", "", "alpha two"])  # an empty document is skipped
    write_jsonl(corpus / "b.json.gz", ["beta"])
    write_jsonl(corpus / "sub" / "c.jsonl", ["gamma"])
    (corpus / "d.txt").write_text("delta\nwith lines\n")
    (corpus / "sub" / "e.txt.gz").write_bytes(gzip.compress("epsilon é".encode()))
    meta = P.prepare([str(corpus / "*.gz"), str(corpus / "d.txt"), str(corpus / "sub")], str(tmp_path / "out"),
                     val_fraction=0.2)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.jsonl.gz", "b.json.gz", "d.txt", "c.jsonl",
                                                                "e.txt.gz"]
    docs = docs_of(tmp_path / "out", "train", T.gpt2()) + docs_of(tmp_path / "out", "val", T.gpt2())
    assert sorted(docs) == sorted(["alpha one", "alpha two", "beta", "delta\nwith lines\n", "gamma", "epsilon é"])
    assert meta["splits"]["val"]["tokens"] > 0 and meta["val_from"] == "documents"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional (gpt-train[parquet])")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first row", None, "second row"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    P.prepare([str(tmp_path / "t.parquet")], str(tmp_path / "out"), val_fraction=0.5)
    tok = T.gpt2()
    docs = docs_of(tmp_path / "out", "train", tok) + docs_of(tmp_path / "out", "val", tok)
    assert docs == ["first row", "second row"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="has no column 'text'"):
        P.prepare([str(tmp_path / "bad.parquet")], str(tmp_path / "out2"))


def test_fsspec_url_input(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/prepare-test/book.txt", b"Call me Ishmael. " * 200)
    meta = P.prepare(["memory://prepare-test/*.txt"], str(tmp_path / "out"))
    assert meta["sources"][0]["path"] == "memory:///prepare-test/book.txt"
    assert decode_all(tmp_path / "out", T.gpt2()) == "Call me Ishmael. " * 200 + EOT


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match=r"input file '.*nope\.txt' not found"):
        P.prepare([P.bundled_corpus(), str(tmp_path / "nope.txt")], str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"no input file matches '.*\*\.jsonl'"):
        P.prepare([str(tmp_path / "*.jsonl")], str(tmp_path / "out"))
    with pytest.raises(DataError, match="cannot read 'nosuchproto://x'"):
        P.prepare(["nosuchproto://x"], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_inputs_without_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(DataError, match="the inputs hold 0 token"):
        P.prepare([str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")], str(tmp_path / "out"))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_hf_urls_need_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "hf", raising=False)
    with pytest.raises(DataError, match=r"reading hf:// needs huggingface_hub \(pip install 'gpt-train\[hf\]'\) "
                                        "and network access"):
        P.prepare(["hf://datasets/someone/corpus/train.parquet"], str(tmp_path / "out"))
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '\nhf = ["huggingface_hub>=' in pyproject  # the extra the message names exists


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2 has no string field 'text'"):
        P.prepare([str(tmp_path / "x.jsonl")], str(tmp_path / "out"))
    (tmp_path / "y.json").write_text('[{"text": "an array"}]\n')
    with pytest.raises(DataError, match=r"y\.json line 1 is not a JSON object"):
        P.prepare([str(tmp_path / "y.json")], str(tmp_path / "out"))
    (tmp_path / "y.json").write_text('[\n  {"text": "an indented array"}\n]\n')
    with pytest.raises(DataError, match=r"y\.json line 1 is not JSON"):
        P.prepare([str(tmp_path / "y.json")], str(tmp_path / "out"))


def test_second_run_is_up_to_date_until_an_input_changes(tmp_path, capsys):
    corpus = tmp_path / "in.txt"
    corpus.write_text("It was the best of times, it was the worst of times. " * 50)
    out = tmp_path / "out"
    P.prepare([str(corpus)], str(out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    P.prepare([str(corpus)], str(out))
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    P.prepare([str(corpus)], str(out), val_fraction=0.01)  # another option: redone
    assert "up to date" not in capsys.readouterr().out
    P.prepare([str(corpus)], str(out), val_fraction=0.01, force=True)
    assert "up to date" not in capsys.readouterr().out
    corpus.write_text("Changed. " * 100)
    os.utime(corpus, ns=(1, 1))
    P.prepare([str(corpus)], str(out), val_fraction=0.01)
    assert "up to date" not in capsys.readouterr().out
    assert decode_all(out, T.gpt2()) == "Changed. " * 100 + EOT


def test_interrupted_run_keeps_the_previous_output(tmp_path, monkeypatch):
    corpus = tmp_path / "in.txt"
    corpus.write_text("Some text to tokenize. " * 100)
    out = tmp_path / "out"
    before = P.prepare([str(corpus)], str(out))
    files = sorted(p.name for p in out.iterdir())

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_encode_item", crash)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([str(corpus)], str(out), force=True)
    assert json.loads((out / "meta.json").read_text()) == before
    assert sorted(p.name for p in out.iterdir()) == files  # no staging folder left behind
    assert decode_all(out, T.gpt2()) == "Some text to tokenize. " * 100 + EOT


def test_trained_tokenizer(tmp_path):
    corpus = tmp_path / "in.txt"
    text = Path(P.bundled_corpus()).read_text(encoding="utf-8")[:200_000]
    corpus.write_text(text, encoding="utf-8")
    meta = P.prepare([str(corpus)], str(tmp_path / "out"), train_tokenizer=512)
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["name"] == "bpe" and meta["tokenizer"]["n_vocab"] == 512
    tok = T.from_identity(meta["tokenizer"], str(tmp_path / "out"))
    assert decode_all(tmp_path / "out", tok) == text + EOT
    assert read_split(tmp_path / "out", "val")[-1] == tok.eot == 511
    P.prepare([str(corpus)], str(tmp_path / "out"), train_tokenizer=512)  # up to date: nothing retrained
    assert T.load_file(tmp_path / "out" / T.BPE_FILE).sha256 == meta["tokenizer"]["sha256"]


def test_a_second_corpus_takes_the_tokenizer_of_the_first_and_the_two_mix(tmp_path):
    """--tokenizer DIR: a learned BPE reused for another corpus (written beside its shards, so the directory
    stands alone), which makes the two one mixture; a run trains on it."""
    book = Path(P.bundled_corpus()).read_text(encoding="utf-8")
    (tmp_path / "a.txt").write_text(book[:120_000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(book[-60_000:], encoding="utf-8")
    first = P.prepare([str(tmp_path / "a.txt")], str(tmp_path / "a"), train_tokenizer=512)
    result = cli("prepare", str(tmp_path / "b.txt"), "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    second = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert second["tokenizer"] == first["tokenizer"]
    assert (tmp_path / "b" / T.BPE_FILE).read_bytes() == (tmp_path / "a" / T.BPE_FILE).read_bytes()
    tok = T.from_identity(second["tokenizer"], str(tmp_path / "b"))
    assert decode_all(tmp_path / "b", tok) == book[-60_000:] + EOT  # lossless with the other text's merges
    again = cli("prepare", str(tmp_path / "b.txt"), "--out", str(tmp_path / "b"), "--tokenizer",
                str(tmp_path / "a" / T.BPE_FILE))  # the file itself names the same tokenizer: up to date
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stdout + again.stderr
    run = cli("train", "default", f"data.sources={tmp_path / 'a'}:0.5,{tmp_path / 'b'}:0.5", f"run_dir={tmp_path / 'run'}",
              "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_tokens=256",
              "train.micro_batch=8", "train.max_steps=2", "train.eval_interval=0", "train.sample_tokens=0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a mixture of" in run.stdout
    for argv, message in [
        (["--tokenizer", str(tmp_path / "a"), "--train-tokenizer", "600"], "give --tokenizer (use that one) or"),
        (["--tokenizer", str(tmp_path / "nowhere.bpe")], "tokenizer file"),
        (["--tokenizer", str(tmp_path)], "is a directory without meta.json"),
    ]:
        bad = cli("prepare", str(tmp_path / "b.txt"), "--out", str(tmp_path / "c"), *argv)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


def test_token_dtype():
    assert P.token_dtype(50257) == np.uint16
    assert P.token_dtype(65536) == np.uint16
    assert P.token_dtype(65537) == np.uint32
    assert P.token_dtype(200_019) == np.uint32


def test_strip_gutenberg(tmp_path):
    book = ("The Project Gutenberg eBook of Tests\r\nlicense text\r\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK TESTS ***\r\n"
            "Chapter 1. It begins.\r\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK TESTS ***\r\nmore license\r\n")
    (tmp_path / "book.txt").write_text(book, newline="")
    P.prepare([str(tmp_path / "book.txt")], str(tmp_path / "out"), strip_gutenberg=True)
    assert decode_all(tmp_path / "out", T.gpt2()) == "Chapter 1. It begins.\r\n" + EOT
    P.prepare([str(tmp_path / "book.txt")], str(tmp_path / "raw"))
    assert decode_all(tmp_path / "raw", T.gpt2()) == book + EOT


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    corpus = tmp_path / "in.txt"
    corpus.write_text("Hello world. " * 100)
    args = parser.parse_args([str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0.1",
                              "--shard-tokens", "50", "--workers", "1"])
    assert P.run(args) == 0
    out = capsys.readouterr().out
    assert "train: 271 tokens in 6 shard(s), 1,175 bytes of text" in out and "val: 31 tokens in 1 shard(s), 125" in out
    assert "MB/s" in out
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for info in meta["splits"].values():  # as prepared before meta.json recorded the bytes of text
        del info["text_bytes"]
    meta_path.write_text(json.dumps(meta))
    P.run(args)
    assert "is up to date" in (out := capsys.readouterr().out) and "records the bytes of text" in out
    with pytest.raises(DataError, match="--val-fraction"):
        P.run(parser.parse_args([str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0"]))
    with pytest.raises(DataError, match="local directory"):
        P.run(parser.parse_args([str(corpus), "--out", "s3://bucket/data"]))


def test_bundled_is_the_default_presets_data_and_refuses_options_that_would_change_it(tmp_path):
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    assert P.run(parser.parse_args(["--bundled", "--out", str(tmp_path / "a"), "--workers", "1"])) == 0
    P.prepare_bundled(str(tmp_path / "b"))
    first, second = (json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab")
    assert first["tokenizer"] == second["tokenizer"] and first["tokenizer"]["n_vocab"] == P.BUNDLED_VOCAB  # one vocab
    for extra, flag in ((["--val-fraction", "0.1"], "--val-fraction"), (["--train-tokenizer", "4096"], "--train-tokenizer"),
                        ([P.bundled_corpus()], "INPUT"), (["--format", "llmc"], "--format")):
        with pytest.raises(DataError, match=f"which {flag} would change"):
            P.run(parser.parse_args(["--bundled", "--out", str(tmp_path / "c"), *extra]))
    with pytest.raises(DataError, match="--bundled needs --out"):
        P.run(parser.parse_args(["--bundled"]))
    assert not (tmp_path / "c").exists()


def test_training_reads_what_prepare_writes(tmp_path):
    data = pytest.importorskip("gpt_train.data")  # imports torch
    assert P.FORMAT == data.FORMAT
    P.prepare([P.bundled_corpus()], str(tmp_path))
    val = data.Split(str(tmp_path), "val", 1024)  # the bundled book's 0.5% tail is one GPT-2-sized window
    assert val.tokens == json.loads((tmp_path / "meta.json").read_text())["splits"]["val"]["tokens"]
    assert T.gpt2().decode(val.window(0)) in Path(P.bundled_corpus()).read_text(encoding="utf-8") + EOT


def test_default_data_folder_is_prepared_from_the_bundled_corpus_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty folder, as after `pip install`
    said = []
    assert not P.ensure_bundled("data/other", say=said.append)  # only the default preset's folder
    assert not (tmp_path / "data").exists() and said == []
    assert P.ensure_bundled("data/moby-dick-bpe16k", say=said.append)
    assert len(said) == 1 and "bundled corpus" in said[0] and "data/moby-dick-bpe16k" in said[0]
    meta = json.loads((tmp_path / "data" / "moby-dick-bpe16k" / "meta.json").read_text())
    assert meta["sources"][0]["path"] == P.bundled_corpus() and meta["splits"]["val"]["tokens"] > 0
    assert meta["tokenizer"]["name"] == "bpe" and meta["tokenizer"]["n_vocab"] == P.BUNDLED_VOCAB
    assert not P.ensure_bundled("./data/moby-dick-bpe16k", say=said.append)  # prepared: nothing to do
    assert len(said) == 1


def test_a_folder_prepared_from_other_input_is_replaced_only_with_force(tmp_path):
    first, second, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "out"
    first.write_text("The whale. " * 3000)
    second.write_text("The sea. " * 3000)
    P.prepare([str(first)], str(out), val_fraction=0.1)
    before = (out / "meta.json").read_text()
    with pytest.raises(DataError, match=r"was prepared from other input \(.*a\.txt\): pass --force"):
        P.prepare([str(second)], str(out), val_fraction=0.1)
    assert (out / "meta.json").read_text() == before  # untouched
    first.write_text("The whale, again. " * 3000)  # its own input, changed: brought up to date without --force
    assert P.prepare([str(first)], str(out), val_fraction=0.1)["sources"][0]["bytes"] == first.stat().st_size
    assert "b.txt" in P.prepare([str(second)], str(out), val_fraction=0.1, force=True)["sources"][0]["path"]
