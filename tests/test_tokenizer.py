"""The GPT-2 tokenizer is OpenAI's, offline; custom BPEs round-trip through a text file; identities are checked."""

import random
import shutil
from pathlib import Path

import pytest
import tiktoken

from gpt_train import tokenizer as T
from gpt_train.errors import DataError
from gpt_train.prepare import bundled_corpus

ASSETS = Path(T.__file__).parent / "assets"
UNICODE = "naïve café — 世界 🎉 Ωμέγα\r\n\ttabs  and   spaces <|endoftext|> don't 12345 \x00\x7f"


def moby(chars: int) -> str:
    return Path(bundled_corpus()).read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="module")
def small_bpe() -> T.Tokenizer:
    return T.train_bpe([moby(200_000)], 300)


def test_gpt2_gives_openai_ids():
    tok = T.gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode(" the") == [262]
    assert (tok.name, tok.n_vocab, tok.eot) == ("gpt2", 50257, 50256)
    assert tok.decode([15496, 995]) == "Hello world"


def test_gpt2_matches_an_independent_implementation():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab=str(ASSETS / "encoder.json"),
                                                               merges=str(ASSETS / "vocab.bpe")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = moby(100_000) + UNICODE
    assert T.gpt2().encode(text) == hf.encode(text).ids


def test_special_token_text_is_ordinary_text():
    tok = T.gpt2()
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_gpt2_fast_path_gives_the_ids_of_the_original_pattern():
    """encode marks where GPT-2's lookahead would split a run of spaces, then runs a pattern without it;
    tiktoken with the original pattern is the reference."""
    tok = T.gpt2()
    reference = tiktoken.Encoding("ref", pat_str=T.GPT2_PATTERN, mergeable_ranks=tok.ranks, special_tokens={})
    for text in (moby(300_000) + UNICODE.replace("\x00", ""), UNICODE):  # the second holds a NUL: no marks
        assert tok.encode(text) == reference.encode_ordinary(text)
    # every kind of white space (Unicode's, and Python-only "spaces" like \x1c) in runs, at the ends, before
    # letters, digits, punctuation and contractions; astral and CJK characters beyond the space table; lone
    # surrogates; NUL, the mark, as text
    alphabet = [" ", "  ", "\n", "\r\n", "\t", "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u2028", "\u3000", "\x1c",
                "a", "Zé", "7", "42", "!", "?!", "'s", "'", "中", "\U0001f389", "\U00030000", "\ud800", "\x00", "<|endoftext|>"]
    rng = random.Random(0)
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert tok.encode(s) == reference.encode_ordinary(s), repr(s)


def test_tampered_gpt2_asset_is_a_clear_error(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(ASSETS / name, tmp_path / name)
    assert T.gpt2(tmp_path).sha256 == T.gpt2().sha256
    data = (tmp_path / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(data[:1000] + b"X" + data[1001:])  # one merge changed
    T._gpt2.cache_clear()
    with pytest.raises(DataError, match=r"vocab\.bpe is corrupted: sha256 [0-9a-f]{64}, expected 1ce16647"):
        T.gpt2(tmp_path)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(DataError, match="cannot be read"):
        T.gpt2(tmp_path)


def test_identity_is_stable_and_distinguishes_tokenizers(small_bpe):
    identity = T.gpt2().identity()
    assert identity == {"name": "gpt2", "sha256": T.gpt2().sha256, "n_vocab": 50257, "eot": 50256}
    assert small_bpe.sha256 != identity["sha256"]
    assert T.train_bpe([moby(200_000)], 300).sha256 == small_bpe.sha256  # training is deterministic


def test_trained_bpe_round_trips_through_a_text_file(small_bpe, tmp_path):
    assert (small_bpe.name, small_bpe.n_vocab, small_bpe.eot) == ("bpe", 300, 299)
    path = tmp_path / "tokenizer.bpe"
    T.save(small_bpe, path)
    header, first = path.read_text(encoding="ascii").splitlines()[:2]  # plain text, no pickle
    assert '"pattern"' in header and first == "AA== 0"
    loaded = T.load_file(path)
    assert loaded.identity() == small_bpe.identity()
    text = moby(5_000) + UNICODE
    assert loaded.encode(text) == small_bpe.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.decode(loaded.encode(UNICODE)) == UNICODE
    assert max(loaded.encode(text)) < loaded.eot


def test_load_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        T.load_file(tmp_path / "missing.bpe")
    (tmp_path / "junk.bpe").write_text("hello\nworld\n")
    with pytest.raises(DataError, match="is not a gpt-train tokenizer"):
        T.load_file(tmp_path / "junk.bpe")


def test_train_bpe_needs_room_for_bytes_and_eot():
    with pytest.raises(DataError, match="at least 257"):
        T.train_bpe(["abc"], 256)


def test_from_identity(small_bpe, tmp_path):
    assert T.from_identity(T.gpt2().identity(), None) is T.gpt2()
    T.save(small_bpe, tmp_path / T.BPE_FILE)
    assert T.from_identity(small_bpe.identity(), str(tmp_path)).sha256 == small_bpe.sha256
    with pytest.raises(DataError, match="is not the one the data or checkpoint was made with"):
        T.from_identity({**small_bpe.identity(), "sha256": "0" * 64}, str(tmp_path))
    with pytest.raises(DataError, match="is not the one"):
        T.from_identity({**T.gpt2().identity(), "sha256": "0" * 64}, None)
    with pytest.raises(DataError, match="data directory is needed"):
        T.from_identity(small_bpe.identity(), None)
    with pytest.raises(DataError, match="not found"):
        T.from_identity(small_bpe.identity(), str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="unknown tokenizer 'sentencepiece'"):
        T.from_identity({"name": "sentencepiece"}, None)
