"""Weighted mixtures of prepared corpora (data.sources): proportions, determinism, per-source validation, and an
exact resume across world sizes under real torchrun."""

import json
import shutil
from pathlib import Path

import pytest
from test_distributed import ENV, ok, torchrun

from gpt_train import data, mixture
from gpt_train.config import DataConfig, Source, load_config
from gpt_train.errors import ConfigError, DataError
from gpt_train.prepare import bundled_corpus, prepare
from helpers import TINY, cli, read_metrics, tiny_data  # noqa: F401

SEQ = 16


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> str:
    """A second corpus with the same (GPT-2) tokenizer: a later part of the bundled text than tiny_data's."""
    root = tmp_path_factory.mktemp("other")
    (root / "corpus.txt").write_text(Path(bundled_corpus()).read_text()[300_000:420_000])
    out = str(root / "prepared")
    prepare([str(root / "corpus.txt")], out, val_fraction=0.1)
    return out


def corpus(*sources: tuple[str, float]) -> mixture.Corpus:
    return mixture.Corpus(DataConfig(sources=[Source(d, w) for d, w in sources]))


def stream_of(c: mixture.Corpus, seed: int = 5):
    return c.stream(c.splits("train", SEQ, None), seed)


def test_shares_are_exact_largest_remainders():
    assert mixture.apportion([0.7, 0.3]) == [717, 307]
    assert mixture.apportion([1, 1, 1]) == [342, 341, 341]
    assert mixture.apportion([5, 3, 2], block=10) == [5, 3, 2]
    assert sum(mixture.apportion([0.123, 0.456, 0.421])) == mixture.BLOCK


def test_samples_come_from_each_source_in_proportion_and_each_source_runs_its_own_epochs(tiny_data, other_data):
    c = corpus((tiny_data, 0.7), (other_data, 0.3))
    stream = stream_of(c)
    # Which corpus a row came from, told by the tokens themselves: every window of each source, by content.
    owners = {}
    for s, split in enumerate(c.splits("train", SEQ, None)):
        for w in range(split.num_windows):
            owners.setdefault(bytes(split.window(w).astype("int64").tobytes()), set()).add(s)
    n = 4 * mixture.BLOCK
    rows = stream.rows(range(n))
    drawn = [owners[bytes(row.numpy().tobytes())] for row in rows]
    assert all(len(o) == 1 for o in drawn[:50])  # the two texts share no window: ownership is unambiguous
    first = sum(1 for o in drawn if o == {0})
    assert first == 4 * 717  # exact over whole blocks
    for lo in range(0, n - 500, 250):  # and close over any 500 consecutive samples, not only per block
        assert abs(sum(1 for o in drawn[lo:lo + 500] if o == {0}) / 500 - 0.7) < 0.08
    # the smaller source (30% of samples) repeats no window before it has shown them all
    other = [bytes(r.numpy().tobytes()) for r, o in zip(rows, drawn) if o == {1}]
    windows_b = c.splits("train", SEQ, None)[1].num_windows
    assert len(set(other[:windows_b])) == min(len(other), windows_b)


def test_an_epoch_of_a_mixture_is_a_pass_over_its_most_repeated_source(tiny_data, other_data):
    c = corpus((tiny_data, 0.7), (other_data, 0.3))
    stream = stream_of(c)
    per_epoch = stream.samples_per_epoch()
    windows = [split.num_windows for split in c.splits("train", SEQ, None)]
    assert per_epoch == min(n * mixture.BLOCK / k for n, k in zip(windows, c.counts))
    assert stream.epochs(round(per_epoch)) == pytest.approx(1.0, abs=1e-3)
    assert stream_of(corpus((tiny_data, 1.0))).samples_per_epoch() == windows[0]  # one source: its windows


def test_the_stream_depends_on_seed_and_position_only(tiny_data, other_data):
    c = corpus((tiny_data, 2), (other_data, 1))
    a, b = stream_of(c), stream_of(corpus((tiny_data, 2), (other_data, 1)))
    assert (a.rows(range(3000, 3040)) == b.rows(range(3000, 3040))).all()  # a new process: the same samples
    assert not (a.rows(range(40)) == stream_of(c, seed=6).rows(range(40))).all()
    # the same global batch for any number of ranks, each rank its contiguous share (Loader's rule)
    batches = {}
    for world in (1, 2, 3):
        loaders = [data.Loader(a, 12, 2, r, world) for r in range(world)]
        batches[world] = [[x for loader in loaders for x, _ in loader.next_batch()] for _ in range(3)]
    for world in (2, 3):
        for one, many in zip(batches[1], batches[world]):
            assert all((p == q).all() for p, q in zip(one, many))


def test_one_source_is_read_exactly_as_data_dir(tiny_data, other_data):
    plain = mixture.Corpus(DataConfig(dir=tiny_data))
    listed = corpus((tiny_data, 1.0))
    assert plain.fingerprint() == listed.fingerprint() == data.fingerprint(data.read_meta(tiny_data))
    split = data.Split(tiny_data, "train", SEQ)
    assert (stream_of(listed).rows(range(64)) == data.Shuffled(split, 5).rows(range(64))).all()
    mixed = corpus((tiny_data, 0.7), (other_data, 0.3)).fingerprint()
    assert mixed not in (plain.fingerprint(), corpus((tiny_data, 0.5), (other_data, 0.5)).fingerprint())
    assert mixed == corpus((tiny_data, 7), (other_data, 3)).fingerprint()  # the same shares, the same stream


def test_bad_sources_are_one_clear_error(tiny_data, other_data, tmp_path):
    (tmp_path / "c.yaml").write_text(f"data:\n  sources:\n    - {{dir: {tiny_data}, wieght: 2}}\n")
    with pytest.raises(ConfigError, match="no key 'wieght'; did you mean 'weight'"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="weight of 'b' must be a positive number"):
        load_config("default", ["data.sources=a:1,b:-1"])
    with pytest.raises(ConfigError, match="below 1/1024"):
        corpus((tiny_data, 1.0), (other_data, 1e-6))
    with pytest.raises(DataError, match="no prepared data in"):
        corpus((tiny_data, 1.0), (str(tmp_path / "missing"), 1.0))
    bpe = tmp_path / "bpe"
    prepare([bundled_corpus()], str(bpe), val_fraction=0.1, train_tokenizer=300)
    with pytest.raises(DataError, match="a mixture needs one tokenizer"):
        corpus((tiny_data, 1.0), (str(bpe), 1.0))


def test_config_forms_of_sources(tmp_path):
    cfg = load_config("default", ["data.sources=data/a:0.7,s3://bucket/b:0.3,data/c"])
    assert cfg.data.sources == [Source("data/a", 0.7), Source("s3://bucket/b", 0.3), Source("data/c", 1.0)]
    (tmp_path / "c.yaml").write_text("extends: default\ndata:\n  sources:\n    - {dir: x, weight: 3, format: llmc}\n"
                                     "    - y:1\n")
    assert load_config(str(tmp_path / "c.yaml")).data.mixture() == [Source("x", 3.0, "llmc"), Source("y", 1.0)]
    assert load_config("default").data.mixture() == [Source("data/moby-dick-bpe16k", 1.0, "auto")]


def test_a_container_job_is_given_every_local_source(tmp_path):
    from launch.spec import local_inputs

    (tmp_path / "a").mkdir()
    cfg = load_config("default", [f"data.sources={tmp_path / 'a'}:2,s3://bucket/b:1,rel/c:1"])
    assert local_inputs("default", cfg) == {"data.sources[0]": str(tmp_path / "a"),
                                            "data.sources[2]": str(Path("rel/c").resolve())}


# -- a real run --------------------------------------------------------------------------------------------

# 12 sequences per step: whole shares on 1, 2 and 3 ranks; micro-batches of 2 accumulate on each
MIX_STEPS = ["train.batch_tokens=384", "train.micro_batch=2", "eval_interval=4", "checkpoint.interval=2",
             "sample_tokens=4"]


def mix_args(sources: str, run: Path, *extra: str) -> list[str]:
    return ["train", "default", f"data.sources={sources}", f"run_dir={run}", *TINY, *MIX_STEPS, *extra]


def traced(folder: Path) -> dict[int, list[str]]:
    """The sequences each step consumed, in global order: by the step's first sample, every rank's share in
    rank order."""
    out: dict[int, list[tuple[int, list[str]]]] = {}
    for f in sorted(folder.glob("rank-*.jsonl")):
        rank = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["sample"], []).append((rank, r["rows"]))
    return {sample: [h for _, rows in sorted(parts) for h in rows] for sample, parts in out.items()}


def test_a_mixture_resumed_on_1_and_3_ranks_consumes_the_same_tokens(tmp_path, tiny_data, other_data):
    sources = f"{tiny_data}:0.7,{other_data}:0.3"
    ref_trace, trace = tmp_path / "ref-trace", tmp_path / "trace"
    ref_trace.mkdir(), trace.mkdir()
    ok(cli(*mix_args(sources, tmp_path / "ref", "max_steps=8"), env={**ENV, data.TRACE_VAR: str(ref_trace)}))
    reference = traced(ref_trace)
    assert len(reference) == 8 and all(len(rows) == 12 for rows in reference.values())

    first = tmp_path / "first"
    ok(torchrun(*mix_args(sources, first, "max_steps=4"), nproc=2, env={data.TRACE_VAR: str(trace)}))
    for nproc in (1, 3):
        run, resumed_trace = tmp_path / f"on{nproc}", tmp_path / f"trace{nproc}"
        shutil.copytree(first, run)
        shutil.copytree(trace, resumed_trace)
        out = ok(torchrun(*mix_args(sources, run, "max_steps=8"), nproc=nproc,
                          env={data.TRACE_VAR: str(resumed_trace)}))
        assert "resum" in out and "step 4" in out, out[-2000:]
        assert traced(resumed_trace) == reference, f"resumed on {nproc} rank(s)"

    vals = [r for r in read_metrics(tmp_path / "on3") if "val_loss" in r]
    assert vals and set(vals[-1]["val_sources"]) == {tiny_data, other_data}
    each = vals[-1]["val_sources"]
    weighted = 717 / 1024 * each[tiny_data]["val_loss"] + 307 / 1024 * each[other_data]["val_loss"]
    assert vals[-1]["val_loss"] == pytest.approx(weighted, rel=1e-9)
    assert vals[-1]["val_bpb"] is not None and each[other_data]["val_bpb"] is not None
    shown = ok(cli("status", str(tmp_path / "on3")))
    assert f"val {each[other_data]['val_loss']:.4f}" in shown and f"on {other_data}" in shown, shown
