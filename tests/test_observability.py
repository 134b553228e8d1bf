"""Issue 7: wandb (offline), TensorBoard, `status`, `plot` and `eval`, on real runs with real restarts."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_train.errors import DataError, UserError
from gpt_train.protocol import EXIT_REQUEUE as REQUEUE_EXIT
from gpt_train.runlog import RunLog
from gpt_train.status import Attempt, attempts, format_report, restart_cause, summarize
from gpt_train.storage import Store
from helpers import REPO, cli, losses, read_metrics, tiny_data, train_args  # noqa: F401

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HELLASWAG = FIXTURES / "hellaswag_tiny.jsonl"


def wandb_env(tmp_path: Path, **extra: str) -> dict:
    """wandb without network and without touching $HOME; WANDB_DIR points elsewhere on purpose: a local
    run directory still gets the files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-dir-env"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               WANDB_DISABLE_GIT="true", XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def popen_train(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt_train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})


def run_until(proc: subprocess.Popen, stop, sig: int) -> str:
    """Read the process's output; send `sig` at the first line for which stop(line) is true; wait for its end."""
    out, sent = [], False
    for line in proc.stdout:
        out.append(line)
        if not sent and stop(line):
            proc.send_signal(sig)
            sent = True
    proc.wait()
    return "".join(out)


def step_line(at_least: int):
    """A predicate: a training log line of a step >= at_least."""
    def stop(line: str) -> bool:
        if line.startswith("step ") and "| loss" in line:
            return int(line.split()[1].split("/")[0]) >= at_least
        return False
    return stop


# -- wandb's offline .wandb file ------------------------------------------------------------------------
# wandb >= 0.19 has no Python reader for its transaction log any more (the datastore module went with the
# move to wandb-core), and `wandb sync --view` is gone. The format is LevelDB's log format (32 KiB blocks of
# CRC-framed chunks) after a 7-byte ":W&B" header; each record is a `Record` message of wandb's own protobuf
# schema (wandb.proto.wandb_internal_pb2), which is what is parsed here.

def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(folder: Path) -> tuple[str, list[tuple[int, dict]]]:
    """(run id, [(step, {key: value})]) of one offline run folder."""
    (log_file,) = folder.glob("*.wandb")
    run_id, rows = None, []
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.append((record.history.step.num, items))
    return run_id, rows


def test_wandb_offline_files_in_the_run_dir_and_a_resume_continues_the_same_run(tmp_path, tiny_data):
    run = tmp_path / "run"
    args = train_args(tiny_data, str(run), "max_steps=14", "checkpoint.interval=5", "eval_interval=7",
                      "sample_interval=3", "logging.wandb=offline")
    env = wandb_env(tmp_path)
    first = run_until(popen_train(args, env), step_line(6), signal.SIGTERM)
    assert f"exiting with {REQUEUE_EXIT}" in first, first[-3000:]
    stopped = max(losses(run))
    second = cli(*args, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]

    run_id = json.loads((run / "run.json").read_text())["id"]
    meta = json.loads((run / "checkpoints" / "step-00000014" / "meta.json").read_text())
    assert meta["run_id"] == run_id
    assert f"(id {run_id}" in first and f"(id {run_id}" in second.stdout  # the "run:" line of each attempt
    assert "wandb sync" in first and "wandb sync" in second.stdout
    folders = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2, sorted(p.name for p in (run / "wandb").iterdir())
    assert not (tmp_path / "wandb-dir-env").exists()  # a local run directory wins over WANDB_DIR

    steps, logged = [], {}
    for folder in folders:
        folder_id, rows = wandb_history(folder)
        assert folder_id == run_id
        steps += [s for s, _ in rows]
        for s, items in rows:
            logged.setdefault(s, {}).update(items)
    assert steps == sorted(set(steps)), f"steps not strictly increasing across the restart: {steps}"
    assert steps == list(range(1, 15))
    assert stopped in (6, 7) and max(s for s, _ in wandb_history(folders[0])[1]) == stopped
    metrics = losses(run)
    assert all(abs(logged[s]["train/loss"] - metrics[s]) < 1e-6 for s in steps)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert {s: logged[s]["val/loss"] for s in steps if "val/loss" in logged[s]} == pytest.approx(vals)
    tables = {s for s in steps if any(k.startswith("samples/") for k in logged[s])}  # a table: nested keys
    assert tables == {3, 6, 9, 12, 14}  # the samples table, at every sample
    assert all(logged[s]["samples/_type"] == "table-file" for s in tables)
    last_table = next((folders[1] / "files").rglob("samples_14_*.table.json"))
    assert [row[0] for row in json.loads(last_table.read_text())["data"]] == [3, 6, 9, 12, 14]  # spans the restart
    assert [r["step"] for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())] == [3, 6, 9, 12, 14]
    assert "\r" not in first and "\r" not in second.stdout  # one line per interval in a log file


def test_unreachable_wandb_service_falls_back_to_offline_and_training_finishes(tmp_path, tiny_data):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "0123456789abcdef" * 2 + "deadbeef"
    env = wandb_env(tmp_path, WANDB_API_KEY=key, WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_INIT_TIMEOUT="5")
    del env["WANDB_MODE"]
    run = tmp_path / "run"
    t0 = time.monotonic()
    result = cli(*train_args(tiny_data, str(run), "max_steps=6", "logging.wandb=auto"), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert time.monotonic() - t0 < 240
    out = result.stdout + result.stderr
    assert out.count("cannot start online") == 1 and "logging offline instead" in out
    assert "could not start" not in out and "wandb: offline run" in out
    assert max(losses(run)) == 6
    run_id = json.loads((run / "run.json").read_text())["id"]
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert key not in out
    for path in run.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert key.encode() not in path.read_bytes(), f"the API key is in {path}"


# -- one finished run: TensorBoard, eval ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("finished") / "run"
    result = cli(*train_args(tiny_data, str(run), "max_steps=6", "logging.tensorboard=true", "sample_interval=3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return run, result


def test_tensorboard_event_files_parse_with_tensorboards_reader(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, result = finished_run
    run_id = json.loads((run / "run.json").read_text())["id"]
    folder = run / "tensorboard" / run_id
    assert list(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    train = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert train == pytest.approx(losses(run), rel=1e-6)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert {e.step: e.value for e in acc.Scalars("val/loss")} == pytest.approx(vals, rel=1e-6)
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, 7))
    assert {"train/tokens", "train/tokens_per_s", "train/grad_norm", "train/step_ms"} <= set(acc.Tags()["scalars"])
    assert any(t.startswith("samples") for t in acc.Tags()["tensors"])
    assert "\r" not in result.stdout


def test_eval_val_reproduces_the_runs_own_val_loss(finished_run):
    run, _ = finished_run
    final = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    # TINY: train.eval_batches=2, train.micro_batch=4: the windows the run evaluated at its last step
    result = cli("eval", str(run), "--task", "val", "--batches", "2", "--micro-batch", "4", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["loss"] == pytest.approx(final, abs=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["sequences"] == 8 and report["tokens"] == 8 * 32
    whole = cli("eval", str(run), "--task", "val")
    assert whole.returncode == 0 and whole.stdout.startswith("val: loss ") and "perplexity" in whole.stdout
    assert "\r" not in whole.stdout + whole.stderr  # no progress bar when stderr is not a terminal


def test_eval_hellaswag_on_a_fixture(finished_run):
    run, _ = finished_run
    result = cli("eval", str(run), "--task", "hellaswag", "--data", str(HELLASWAG), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["items"] == 6 and 0 <= report["correct"] <= 6
    assert report["accuracy"] == report["correct"] / 6 and report["accuracy_sum"] == report["correct_sum"] / 6
    limited = cli("eval", str(run), "--task", "hellaswag", "--data", str(HELLASWAG), "--limit", "2")
    assert limited.returncode == 0 and "/2," in limited.stdout and "\r" not in limited.stderr


def test_hellaswag_batched_scores_equal_one_sequence_at_a_time(finished_run):
    import torch
    import torch.nn.functional as F

    from gpt_train import inference
    from gpt_train.evaluate import ending_losses, read_hellaswag

    run, _ = finished_run
    loaded = inference.load(str(run), "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    item = read_hellaswag(str(HELLASWAG))[1]
    ctx = tokenizer.encode(item["ctx"])[-8:]  # context and ending within the tiny model's block of 32
    endings = [tokenizer.encode(" " + e) for e in item["endings"]]
    assert max(map(len, endings)) + len(ctx) <= 33
    assert len(set(map(len, endings))) > 1  # padding is exercised
    with torch.no_grad():
        batched = ending_losses(model, ctx, endings, torch.device("cpu"))
        for (total, count), end in zip(batched, endings):
            seq = torch.tensor([ctx + end])
            logits, _ = model(seq[:, :-1], seq[:, 1:])
            per_token = F.cross_entropy(logits[0, len(ctx) - 1 :, : model.vocab_size].float(), seq[0, len(ctx) :],
                                        reduction="none")
            assert count == len(end)
            assert total == pytest.approx(per_token.sum().item(), rel=1e-5)
        # a context longer than the model's block: its start is cut, the ending is kept whole
        long_ctx = ctx * 20
        cut = ending_losses(model, long_ctx, endings, torch.device("cpu"))
        assert [c for _, c in cut] == [len(e) for e in endings]


def test_hellaswag_picks_the_lowest_mean_loss_not_the_lowest_total(monkeypatch):
    from gpt_train import evaluate

    class Tok:
        eot = 0

        def encode(self, text):
            return [1, 2]

    # ending 0: 3 tokens, mean 1.0, total 3.0; ending 1: 1 token, mean 2.0, total 2.0
    monkeypatch.setattr(evaluate, "ending_losses", lambda model, ctx, ends, device: [(3.0, 3), (2.0, 1), (9.0, 1), (8.0, 2)])
    items = [{"ctx": "x", "endings": ["a b c", "d", "e", "f g"], "label": 0}]
    result = evaluate.hellaswag(None, Tok(), items, "cpu")
    assert (result["accuracy"], result["accuracy_sum"]) == (1.0, 0.0)


def test_hellaswag_file_errors(tmp_path, capsys):
    from gpt_train.cli import main
    from gpt_train.evaluate import read_hellaswag

    bad = tmp_path / "bad.jsonl"
    bad.write_text(HELLASWAG.read_text().splitlines()[0] + "\n" + json.dumps({"ctx": "x", "endings": ["a"], "label": 3}) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_hellaswag(str(bad))
    with pytest.raises(DataError, match="not found"):
        read_hellaswag(str(tmp_path / "missing.jsonl"))
    official = tmp_path / "official.jsonl"  # the official files' fields, without a "ctx"
    official.write_text(json.dumps({"ctx_a": "A man sits down.", "ctx_b": "he", "endings": ["a", "b", "c", "d"],
                                    "label": "2", "activity_label": "x"}) + "\n")
    assert read_hellaswag(str(official)) == [{"ctx": "A man sits down. He", "endings": ["a", "b", "c", "d"], "label": 2}]
    assert main(["eval", str(tmp_path), "--task", "hellaswag"]) == 2
    assert "--data" in capsys.readouterr().err


# -- status and plot ---------------------------------------------------------------------------------------

def check_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the image is (nearly) blank"


def restarted_run(run: str, tiny_data: str, first_stop, extra: list[str], env: dict | None = None,
                  first_env: dict | None = None) -> tuple[str, str, str]:
    """A run stopped once by `first_stop` (returns the first attempt's output), killed with SIGKILL a few steps
    after it resumed (a crash), and resumed again to the end: two restarts. The outputs of the three attempts."""
    args = train_args(tiny_data, run, *extra)
    env = env or {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = first_stop(popen_train(args, {**env, **(first_env or {})}))
    assert f"exiting with {REQUEUE_EXIT}" in first, first[-3000:]
    resumed_at = int(first.split("preemption: ")[1].split(" at step ")[1].split(":")[0])

    seen = []

    def after_checkpoint(line: str) -> bool:
        # past a checkpoint of this attempt: its resume event and metrics have been flushed on any storage
        if line.startswith("checkpoint: step ") and "snapshot taken" in line and int(line.split()[2]) > resumed_at:
            seen.append(line)
        return bool(seen) and step_line(resumed_at + 1)(line)

    second = run_until(popen_train(args, env), after_checkpoint, signal.SIGKILL)
    third = cli(*args, env=env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-2000:]
    return first, second, third.stdout


def test_status_and_plot_of_a_local_run_with_a_time_limit_and_a_crash(tmp_path, tiny_data):
    run = str(tmp_path / "run")
    # The job's end is 600 s away and the margin 600 s: the run stops at once, as before a time limit; the ranks
    # agree on it a step late, so after its second step.
    deadline = {"GPT_TRAIN_DEADLINE": str(time.time() + 600)}
    restarted_run(run, tiny_data, lambda p: run_until(p, lambda line: False, signal.SIGTERM),
                  ["max_steps=12", "preemption.deadline_margin_s=600"], first_env=deadline)

    result = cli("status", run, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout)
    assert [x["cause"] for x in r["restarts"]] == ["time limit", "crash"]
    assert r["restarts"][0]["detail"] == "deadline"
    assert r["finished"] is True and r["state"] == "finished" and r["attempts"] == 3
    assert (r["step"], r["max_steps"], r["checkpoint"]["step"], r["train_loss"]["step"]) == (12, 12, 12, 12)
    assert r["train_loss"]["value"] == losses(run)[12]
    assert r["val_loss"]["step"] == 12 and r["tokens"] == 12 * 256 and r["tokens_per_s"] > 0
    assert r["elapsed_s"] > 0 and r["wall_s"] >= r["elapsed_s"] and r["remaining_s"] is None
    assert r["id"] == json.loads(Path(run, "run.json").read_text())["id"]
    assert (r["restarts"][0]["stopped_at_step"], r["restarts"][0]["resumed_at_step"]) == (2, 2)
    assert r["restarts"][1]["resumed_at_step"] in (2, 4)  # killed after step 4's checkpoint was taken

    text = cli("status", run)
    assert text.returncode == 0
    assert "restarts:   2" in text.stdout and "time limit (deadline)" in text.stdout and "crash" in text.stdout
    assert "step:       12 / 12 (100.0%)" in text.stdout and "finished:   yes" in text.stdout

    png = tmp_path / "plots" / "loss.png"
    plotted = cli("plot", run, "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert "2 restart(s) marked" in plotted.stdout
    check_png(png, (1200, 800))

    other = tmp_path / "other"  # several runs overlaid
    shutil.copytree(run, other)
    small = tmp_path / "both.png"
    plotted = cli("plot", run, str(other), "-o", str(small), "--width", "8", "--height", "5", "--dpi", "50")
    assert plotted.returncode == 0 and "2 run(s), 4 restart(s)" in plotted.stdout
    check_png(small, (400, 250))


@pytest.mark.s3
def test_status_plot_wandb_and_tensorboard_of_a_run_on_s3_with_a_preemption_and_a_crash(s3_bucket, tiny_data, tmp_path):
    run = f"{s3_bucket}/runs/observed"
    first, _, last = restarted_run(
        run, tiny_data, lambda p: run_until(p, step_line(4), signal.SIGTERM),
        ["max_steps=12", "checkpoint.interval=3", "eval_interval=6", "logging.tensorboard=true", "logging.wandb=offline"],
        env=wandb_env(tmp_path))  # wandb's and TensorBoard's local files in tmp_path (WANDB_DIR, XDG_CACHE_HOME)
    assert "wandb's files are written under" in first and "tensorboard: run_dir is not on local disk" in first

    result = cli("status", run, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout)
    assert [(x["cause"], x["detail"]) for x in r["restarts"]] == [
        ("preempted", "SIGTERM"), ("crash", "no end recorded (killed, or its node was lost)")]
    assert r["finished"] is True and (r["step"], r["max_steps"], r["checkpoint"]["step"]) == (12, 12, 12)
    assert r["run"] == run and r["val_loss"]["step"] == 12
    text = cli("status", run)
    assert text.returncode == 0 and "preempted (SIGTERM)" in text.stdout and "restarts:   2" in text.stdout

    png = tmp_path / "s3.png"
    plotted = cli("plot", run, "-o", str(png), "--dpi", "80")
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    check_png(png, (960, 640))

    # the dashboards' files reached the bucket: TensorBoard's (copied at each checkpoint) parse with its reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = Store(run)
    run_id = json.loads(store.read_text("run.json"))["id"]
    local = tmp_path / "tb"
    local.mkdir()
    for name in store.listdir(f"tensorboard/{run_id}"):
        (local / name).write_bytes(store.read_bytes(f"tensorboard/{run_id}/{name}"))
    acc = EventAccumulator(str(local))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps[-1] == 12 and set(steps) == set(range(1, 13))
    # wandb's offline runs of the attempts that ended cleanly were copied next to the run's records
    folders = [n for n in store.listdir("wandb") if n.startswith("offline-run-") and n.endswith(run_id)]
    assert len(folders) >= 2, folders
    assert all(store.exists(f"wandb/{f}/run-{run_id}.wandb") for f in folders)
    assert "wandb sync" in last


# -- the pieces, without training ------------------------------------------------------------------------

def test_restart_causes():
    def ended(end, cause=None, slurm=None):
        return Attempt(kind="resume", start_time=0, start_step=0, slurm_job=slurm, end=end, end_cause=cause)

    assert restart_cause(ended("preempted", "deadline")) == ("time limit", "deadline")
    assert restart_cause(ended("preempted", "SIGUSR2", slurm="42")) == ("time limit", "SIGUSR2")
    assert restart_cause(ended("preempted", "SIGUSR2")) == ("preempted", "SIGUSR2")  # not under SLURM
    assert restart_cause(ended("preempted", "SIGTERM", slurm="42")) == ("preempted", "SIGTERM")
    assert restart_cause(ended("preempted", "peer")) == ("preempted", "peer")
    assert restart_cause(ended("finish")) == ("extended", None)
    assert restart_cause(ended(None)) == ("crash", None)

    events = [{"event": "start", "time": 100, "step": 0}, {"event": "start", "time": 200, "step": 0},  # died before a checkpoint
              {"event": "preempted", "time": 260, "step": 5, "cause": "SIGTERM"},
              {"event": "resume", "time": 300, "step": 5}]
    metrics = [{"step": 1, "loss": 9.0, "time": 110, "step_ms": 1000.0, "tokens": 10},
               {"step": 3, "loss": 8.0, "time": 130, "step_ms": 1000.0, "tokens": 30},
               {"step": 5, "loss": 7.0, "time": 250, "step_ms": 1000.0, "tokens": 50},
               {"step": 7, "loss": 6.0, "time": 320, "step_ms": 2000.0, "tokens": 70}]
    found = attempts(events, metrics)
    # an attempt that another start followed is over, with no record of how: a crash
    assert [(a.end, a.last_step, a.end_time) for a in found] == [("crash", 3, 130), ("preempted", 5, 260), (None, 7, 320)]


def test_status_summary_of_a_run_in_progress(tmp_path):
    store = Store(str(tmp_path))
    store.write_text("config.yaml", "train:\n  max_steps: 100\ncheckpoint:\n  interval: 10\n")
    store.write_text("events.jsonl", json.dumps({"event": "start", "time": 1000.0, "step": 0}) + "\n")
    store.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in [
        {"step": 10, "loss": 5.0, "tokens": 1000, "step_ms": 500.0, "tokens_per_s": 2000.0, "time": 1005.0},
        {"step": 10, "val_loss": 5.5, "tokens": 1000, "time": 1006.0},
        {"step": 20, "loss": 4.0, "tokens": 2000, "step_ms": 500.0, "tokens_per_s": 2000.0, "time": 1010.0},
    ]) + '{"step": 21, "lo')  # a line cut by a kill
    from gpt_train.status import read_run

    r = summarize(read_run(str(tmp_path)), now=1020.0)
    assert r["state"].startswith("running") and not r["finished"]
    assert (r["step"], r["max_steps"], r["progress"]) == (20, 100, 0.2)
    assert r["remaining_s"] == pytest.approx(80 * 0.5) and r["elapsed_s"] == pytest.approx(10.0)
    assert r["checkpoint"] is None and r["restarts"] == []
    assert "remaining:  about 40s" in format_report(r)
    later = summarize(read_run(str(tmp_path)), now=1010.0 + 3600)
    assert later["state"].startswith("stopped without a final record")
    with pytest.raises(UserError, match="no run"):
        read_run(str(tmp_path / "missing"))


def test_run_id_is_made_once_and_kept_across_restarts(tmp_path):
    store = Store(str(tmp_path / "run"))
    first = RunLog.identify(store)
    assert json.loads(store.read_text("run.json"))["id"] == first
    log = RunLog(store, resume_step=0)
    assert log.run_id == first
    log.event("start", step=0)
    log.close()
    assert RunLog.identify(store) == first  # a restart before the first checkpoint: the same run
    assert RunLog.identify(store, {"run_id": first}) == first
    assert RunLog.identify(store, {"run_id": "fromckpt1234"}) == "fromckpt1234"  # the checkpoint's id wins
    assert json.loads(store.read_text("run.json"))["id"] == "fromckpt1234"
    store.remove("events.jsonl")  # what resume=none, overwrite=true removes
    assert RunLog.identify(store) not in (first, "fromckpt1234")


def test_runlog_never_sends_a_step_twice_to_the_dashboards(tmp_path):
    store = Store(str(tmp_path))
    sent = []

    class Sink:
        def log(self, values, step):
            sent.append(step)

        def close(self):
            pass

    log = RunLog(store, resume_step=0)
    log.wandb = Sink()
    for step in range(1, 8):
        log.metric(step=step, loss=1.0 / step, lr=1e-3, grad_norm=float("nan"), mfu=None, tokens=step * 10)
    log.close()
    log = RunLog(store, resume_step=4)  # resumed from the checkpoint of step 4: steps 5..7 run again
    log.wandb = Sink()
    for step in range(5, 10):
        log.metric(step=step, loss=1.0 / step, tokens=step * 10)
    log.close()
    assert sent == list(range(1, 10))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 10))


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    from gpt_train import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"gpt-train\[plot\]"):
        plot._matplotlib()
