"""Sampling: greedy is the argmax chain, seeds reproduce, filters degenerate to greedy, eot and context limits hold."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest
import torch

from gpt_train import inference, tokenizer
from gpt_train.config import Config, ModelConfig
from gpt_train.model import GPT
from gpt_train.sampling import _filter_logits, add_arguments, run, sample
from helpers import REPO, cli, one_line_error, read_metrics, tiny_data, train_args  # noqa: F401 (tiny_data: a fixture)

VOCAB, BLOCK = 50, 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=VOCAB)).eval()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_the_argmax_chain(model):
    prompt = [1, 2, 3]
    idx = torch.tensor([prompt])
    expected = []
    with torch.no_grad():
        for _ in range(3):
            logits, _ = model(idx)
            nxt = int(logits[0, -1].argmax())
            expected.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    got = sample(model, prompt, 3, temperature=0.0, num_samples=2)
    assert got == [expected, expected]
    assert sample(model, prompt, 3, temperature=0.0) == [expected]


def test_same_seed_same_samples_different_seed_different(model):
    a = sample(model, [5], 20, num_samples=3, generator=_seeded(1))
    b = sample(model, [5], 20, num_samples=3, generator=_seeded(1))
    c = sample(model, [5], 20, num_samples=3, generator=_seeded(2))
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) == 3  # the batched samples are not copies of one another


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = sample(model, [7, 8], 10, temperature=0.0, num_samples=2)
    assert sample(model, [7, 8], 10, top_k=1, num_samples=2, generator=_seeded(3)) == greedy
    assert sample(model, [7, 8], 10, top_p=1e-6, num_samples=2, generator=_seeded(3)) == greedy


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()  # softmax gives these probabilities back
    kept = lambda top_k, top_p: torch.isfinite(_filter_logits(logits, top_k, top_p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [False, True, False, True]
    assert kept(0, 0.4) == [False, True, False, False]  # the top token alone already reaches p
    assert kept(0, 0.7) == [False, True, False, True]  # smallest set with mass >= p
    kept_80 = kept(0, 0.8)  # needs one of the two tied 0.125 tokens, whichever the sort ranks first
    assert kept_80[1] and kept_80[3] and sum(kept_80) == 3
    assert kept(0, 0.9) == [True] * 4
    assert kept(0, 1.0) == [True] * 4


def test_context_longer_than_block_size_is_cropped(model):
    prompt = list(range(40))
    long = sample(model, prompt, 5, temperature=0.0)
    assert long == sample(model, prompt[-BLOCK:], 5, temperature=0.0)


def test_stops_at_eot(model):
    full = sample(model, [1], 8, temperature=0.0)[0]
    eot = full[3]
    assert sample(model, [1], 8, temperature=0.0, eot=eot) == [full[: full.index(eot)]]
    # Batched samples stop at different steps; each is cut at its own first eot, none contains it.
    samples = sample(model, [1], 30, num_samples=8, generator=_seeded(0), eot=0)
    free = sample(model, [1], 30, num_samples=8, generator=_seeded(0))
    for cut, whole in zip(samples, free):
        assert 0 not in cut and whole[: len(cut)] == cut


def test_restores_train_mode_and_tracks_no_grad(model):
    model.train()
    try:
        out = sample(model, [1], 2, generator=_seeded(0))
        assert model.training
    finally:
        model.eval()
    assert len(out[0]) == 2
    sample(model, [1], 2, generator=_seeded(0))
    assert not model.training


def test_rejects_empty_prompt_and_bad_settings(model):
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [], 2)
    with pytest.raises(ValueError, match="top_p=0"):
        sample(model, [1], 2, top_p=0.0)


class _CharTokenizer:
    eot = VOCAB - 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) % (VOCAB - 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _loaded(model) -> inference.Loaded:
    return inference.Loaded(model, _CharTokenizer(), Config(), torch.device("cpu"))


def test_cli_prints_each_sample(model, monkeypatch, capsys):
    loaded = []

    def load(source: str, device: str, which: str):
        loaded.append((source, device, which))
        return _loaded(model)

    monkeypatch.setattr(inference, "load", load)
    args = _parse(["runs/x", "--prompt", "hi", "--max-new-tokens", "4", "--num-samples", "2", "--temperature",
                   "0", "--device", "cpu"])
    assert run(args) == 0
    assert loaded == [("runs/x", "cpu", "newest")]
    lines = capsys.readouterr().out.splitlines()
    greedy = _CharTokenizer().decode(sample(model, _CharTokenizer().encode("hi"), 4, temperature=0.0)[0])
    assert lines == ["----- sample 1 -----", "hi" + greedy, "----- sample 2 -----", "hi" + greedy]


def test_cli_seed_reproduces(model, monkeypatch, capsys):
    monkeypatch.setattr(inference, "load", lambda source, device, which: _loaded(model))
    outputs = []
    for seed in ("1", "1", "2"):
        run(_parse(["ckpt", "--max-new-tokens", "12", "--seed", seed, "--device", "cpu"]))
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize("argv", [
    [],  # neither a run nor --hf
    ["runs/x", "--hf", "dir"],  # both
    ["runs/x", "--top-p", "0"],
    ["runs/x", "--top-p", "1.5"],
    ["runs/x", "--temperature", "-1"],
    ["runs/x", "--num-samples", "0"],
    ["runs/x", "--top-k", "x"],
])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2


def test_cli_samples_from_hugging_face_dir(monkeypatch, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=VOCAB,
                                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    monkeypatch.setattr(tokenizer, "gpt2", _CharTokenizer)
    assert run(_parse(["--hf", str(tmp_path), "--prompt", "", "--max-new-tokens", "3", "--device", "cpu"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "----- sample 1 -----" and len(lines) == 2


def test_the_readme_python_example_runs_on_a_trained_run(tmp_path, tiny_data, monkeypatch, capsys):
    """The README's snippet, as written, on a run trained by the CLI into runs/default of the working folder."""
    done = subprocess.run([sys.executable, "-m", "gpt_train", *train_args(tiny_data, "runs/default", "max_steps=2")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (snippet,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    ids, loaded = namespace["ids"], namespace["m"]
    assert len(ids) == 40 and all(0 <= i < loaded.model.cfg.vocab_size for i in ids)
    assert capsys.readouterr().out == loaded.tokenizer.decode(ids) + "\n"


def test_generate_eval_and_export_read_the_checkpoint_asked_for(tmp_path, tiny_data):
    """--checkpoint newest (the default), best (the lowest val loss) or a step, for the three commands that read
    a run's model; a step the run does not have, or a choice given with a checkpoint folder, is one line."""
    run = tmp_path / "run"
    trained = cli(*train_args(tiny_data, str(run), "max_steps=6", "eval_interval=2"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    val = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    best = min(val, key=val.get)
    for which, step in (("newest", 6), ("best", best), ("2", 2)):
        out = tmp_path / f"{which}.safetensors"
        done = cli("export", str(run), str(out), "--checkpoint", which)
        assert done.returncode == 0 and f"checkpoints/step-{step:08d} (step {step}," in done.stdout, done.stdout
        evaluated = cli("eval", str(run), "--task", "val", "--batches", "1", "--checkpoint", which, "--json")
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        assert json.loads(evaluated.stdout)["step"] == step
    one_line_error(cli("generate", str(run), "--checkpoint", "3", "--max-new-tokens", "2"),
                   "has no checkpoint of step 3; its checkpoints: 2, 4, 6")
    one_line_error(cli("export", str(run / "checkpoints" / "step-00000002"), str(tmp_path / "x.safetensors"),
                       "--checkpoint", "best"), "is a checkpoint folder: --checkpoint best chooses among")
    one_line_error(cli("generate", str(run), "--checkpoint", "latest"), "give newest, best or a step number")
