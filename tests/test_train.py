"""The training entrypoint end to end, as a user runs it: a real process, real files."""

import json
import math
import os
import subprocess

import pytest
import yaml

from gpt_train import data
from helpers import cli, losses, one_line_error, read_metrics, tiny_data, train_args  # noqa: F401


def test_tiny_run_learns_writes_its_records_and_samples(tmp_path, tiny_data):
    run = tmp_path / "run"
    result = cli(*train_args(tiny_data, str(run), "max_steps=30", "eval_interval=10"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for expected in ("world: 1 rank(s)", "device: cpu", "model:", "no checkpoint found: starting fresh",
                     "sample at step 30:", "done: step 30"):
        assert expected in out
    train_loss = losses(run)
    assert sorted(train_loss) == list(range(1, 31))
    assert sum(train_loss[s] for s in range(26, 31)) / 5 < train_loss[1] - 1.5
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert (run / "config.yaml").read_text().count("n_embd: 32") == 1
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000030"


def test_second_start_of_a_finished_run_does_nothing(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=4")).returncode == 0
    again = cli(*train_args(tiny_data, str(run), "max_steps=4"))
    assert again.returncode == 0 and "run already complete at step 4/4" in again.stdout


@pytest.mark.parametrize("extra, fragments", [
    (["optim.lrr=1"], ["unknown config key 'optim.lrr'", "did you mean 'optim.lr'?"]),
    (["max_steps=ten"], ["config key 'train.max_steps' expects int"]),
    (["model.vocab_size=1000"], ["model.vocab_size' is 1000", "gpt2 (50257 tokens)"]),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_data, extra, fragments):
    one_line_error(cli(*train_args(tiny_data, str(tmp_path / "run"), *extra)), *fragments)
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_clear_line(tmp_path):
    one_line_error(cli(*train_args(str(tmp_path / "nope"), str(tmp_path / "run"))), "no prepared data in", "gpt-train prepare")


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=2")).returncode == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = cli(*train_args(tiny_data, str(run), "max_steps=4", "model.n_embd=64"))
    one_line_error(result, "is of another model", "model.n_embd: checkpoint 32, config 64")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_none_refuses_to_overwrite(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=2")).returncode == 0
    one_line_error(cli(*train_args(tiny_data, str(run), "max_steps=2", "resume=none")), "already has checkpoints")
    fresh = cli(*train_args(tiny_data, str(run), "max_steps=2", "resume=none", "overwrite=true"))
    assert fresh.returncode == 0 and "old checkpoints removed" in fresh.stdout


def test_unreachable_bucket_is_one_clear_line(tmp_path, tiny_data):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_MAX_ATTEMPTS": "1", "AWS_DEFAULT_REGION": "us-east-1"}
    result = cli(*train_args(tiny_data, "s3://no-such-bucket/run"), env=env)
    one_line_error(result, "s3://no-such-bucket/run")


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="mounting a small tmpfs needs root")
def test_full_disk_is_reported_and_the_last_good_checkpoint_survives(tmp_path, tiny_data):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28m", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        # A checkpoint of the tiny model (weights and AdamW state) is ~19 MB: the first fits, the second does not.
        result = cli(*train_args(tiny_data, str(run), "max_steps=4", "checkpoint.interval=2"))
        assert result.returncode != 0
        assert "Traceback" not in result.stderr + result.stdout
        assert "no space left on device" in result.stdout
        assert "the last good checkpoint is step-00000002" in result.stdout
        from gpt_train.checkpoint import Checkpointer
        assert Checkpointer(str(run), 3, True).load_newest().step == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, tiny_data):
    first = tmp_path / "first"
    assert cli(*train_args(tiny_data, str(first), "max_steps=6")).returncode == 0
    second = tmp_path / "second"
    result = cli(*train_args(tiny_data, str(second), "max_steps=2", f"checkpoint.init_from={first}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no checkpoint of its own: starting from the weights of {first}" in result.stdout
    # Its own run from step 1, on weights that have learned: the first batch's loss is below a fresh start's.
    assert sorted(losses(second)) == [1, 2] and losses(second)[1] < losses(first)[1] - 0.3
    meta = json.loads((second / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["run_id"] != json.loads((first / "run.json").read_text())["id"]

    again = cli(*train_args(tiny_data, str(second), "max_steps=3", f"checkpoint.init_from={first}"))
    assert again.returncode == 0 and f"checkpoint.init_from={first} ignored: the run has its own" in again.stdout
    assert sorted(losses(second)) == [1, 2, 3]


@pytest.mark.parametrize("extra, fragments", [
    (["model.n_embd=64"], ["is of another model", "model.n_embd: checkpoint 32, config 64"]),
    (["checkpoint.init_from=NOWHERE"], ["no valid checkpoint in", "nowhere' (expected a run directory"]),
])
def test_init_from_a_bad_source_is_one_clear_line(tmp_path, tiny_data, extra, fragments):
    first = tmp_path / "first"
    assert cli(*train_args(tiny_data, str(first), "max_steps=2")).returncode == 0
    init = [] if any(e.startswith("checkpoint.init_from") for e in extra) else [f"checkpoint.init_from={first}"]
    extra = [e.replace("NOWHERE", str(tmp_path / "nowhere")) for e in extra]
    one_line_error(cli(*train_args(tiny_data, str(tmp_path / "new"), "max_steps=2", *init, *extra)), *fragments)


def test_wall_clock_checkpoints_come_between_step_intervals(tmp_path, tiny_data):
    # No step interval; a save whenever 2 s have passed. From step 3 on every step sleeps 3 s (the `slow`
    # fault), so each of them is due whatever the machine's speed; the ranks agree on it a step later.
    run = tmp_path / "run"
    result = cli(*train_args(tiny_data, str(run), "max_steps=6", "checkpoint.interval=0",
                             "checkpoint.every_minutes=0.0333"), env={"GPT_TRAIN_FAULT": "slow@step=3"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    # Each save restarts the clock, and the ranks hear "due" a step late: a save every other slowed step.
    assert saved[-1] == 6 and set(saved) & {3, 4, 5}, saved
    # Not due: the final checkpoint only.
    quiet = tmp_path / "quiet"
    result = cli(*train_args(tiny_data, str(quiet), "max_steps=6", "checkpoint.interval=0",
                             "checkpoint.every_minutes=60"), env={"GPT_TRAIN_FAULT": "slow@step=3"})
    assert result.returncode == 0 and [p.name for p in (quiet / "checkpoints").glob("step-*")] == ["step-00000006"]


def test_the_embedded_default_prepares_its_corpus_in_an_empty_folder(tmp_path):
    # After `pip install` there is no `make train`: `gpt-train train default` must work where it is run.
    result = cli("train", "default", "max_steps=2", "eval_batches=1", "sample_tokens=0", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data/moby-dick-bpe16k holds no prepared data: preparing the bundled corpus into it" in result.stdout
    assert (tmp_path / "data" / "moby-dick-bpe16k" / "meta.json").is_file() and "done: step 2" in result.stdout


@pytest.mark.parametrize("log_interval", [1, 5])
def test_without_skipping_a_diverged_run_never_checkpoints_nan_and_resumes_from_the_last_good_one(
        tmp_path, tiny_data, log_interval):
    """fault.max_bad_steps=0: a non-finite step ends the run at that step (logged or not), with nothing saved."""
    steps = ["max_steps=6", "checkpoint.interval=2", "fault.max_bad_steps=0", f"train.log_interval={log_interval}"]
    run = tmp_path / "run"
    result = cli(*train_args(tiny_data, str(run), *steps), env={"GPT_TRAIN_FAULT": "nan@step=3"})
    one_line_error(result, "training diverged at step 2: the loss or the gradient norm is not finite at step 3",
                   "nothing from it was saved", "Lower optim.lr")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and events[-1]["checkpoint_saved"] is False
    resumed = cli(*train_args(tiny_data, str(run), *steps))
    assert resumed.returncode == 0 and "(step 2)" in resumed.stdout, resumed.stderr[-2000:]


def test_a_second_trainer_on_the_same_run_dir_refuses_naming_the_first(tmp_path, tiny_data):
    import signal
    import sys

    from helpers import REPO
    run = tmp_path / "run"
    args = train_args(tiny_data, str(run), "max_steps=400", "checkpoint.interval=50")
    first = subprocess.Popen([sys.executable, "-m", "gpt_train", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in first.stdout:
            if line.startswith("step      3/400"):
                break
        second = cli(*args)
        one_line_error(second, f"run directory {run} is in use by host", f"pid {first.pid}")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75
    events = [json.loads(x)["event"] for x in (run / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "preempted"]  # the refused trainer wrote nothing
    assert not (run / "lease.json").exists()  # given back after the last checkpoint landed
    resumed = cli(*train_args(tiny_data, str(run), "max_steps=8"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_resume_best_rolls_back_once_and_keeps_the_newer_checkpoints(tmp_path, tiny_data):
    run = tmp_path / "run"
    steps = ["checkpoint.interval=2", "eval_interval=2"]
    assert cli(*train_args(tiny_data, str(run), "max_steps=4", *steps)).returncode == 0
    # Steps 5-8 at a learning rate far too high: their val losses are worse, step 4 stays the best.
    worse = cli(*train_args(tiny_data, str(run), "max_steps=8", *steps, "optim.lr=0.5", "schedule.min_lr=0.5"))
    assert worse.returncode == 0, worse.stderr[-2000:]
    val = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert min(val, key=val.get) == 4, val

    back = cli(*train_args(tiny_data, str(run), "max_steps=8", *steps, "checkpoint.resume=best"))
    assert back.returncode == 0, back.stderr[-2000:]
    assert "rolled back from step 8 to the best checkpoint" in back.stdout and "(step 4," in back.stdout
    assert sorted(p.name for p in (run / "rolled-back").iterdir()) == ["step-00000006", "step-00000008"]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    rollback = [e for e in events if e["event"] == "rollback"]
    assert len(rollback) == 1 and (rollback[0]["from_step"], rollback[0]["to_step"], rollback[0]["set_aside"]) == (8, 4, [6, 8])
    new_val = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert new_val[6] < val[6] and new_val[8] < val[8]  # the new branch, at the sane learning rate

    # A requeue reruns the same command: it continues the new branch instead of rolling back again.
    again = cli(*train_args(tiny_data, str(run), "max_steps=10", *steps, "checkpoint.resume=best"))
    assert again.returncode == 0 and f"resuming from {run}/checkpoints/step-00000008 (step 8)" in again.stdout
    status = json.loads(cli("status", str(run), "--json").stdout)
    assert [r["step"] for r in status["rolled_back"]] == [6, 8]


def test_resume_from_a_chosen_step_rolls_back_once_and_replays_the_same_steps(tmp_path, tiny_data):
    """checkpoint.resume=4 of a run at step 8: back to step 4, steps 6 and 8 set aside, and the steps run again
    with the same settings have the losses they had (the resume is exact); the same command again goes on."""
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=8")).returncode == 0
    first = losses(run)
    one_line_error(cli(*train_args(tiny_data, str(run), "max_steps=8", "checkpoint.resume=3")),
                   "checkpoint.resume=3: ", "has no checkpoint of step 3; its checkpoints: 2, 4, 6, 8")
    one_line_error(cli(*train_args(tiny_data, str(run), "checkpoint.resume=latest")),
                   "must be one of auto, none, best or a step number; got 'latest'")

    back = cli(*train_args(tiny_data, str(run), "max_steps=8", "checkpoint.resume=00000004"))
    assert back.returncode == 0, back.stderr[-2000:]
    assert f"rolled back from step 8 to the checkpoint {run}/checkpoints/step-00000004 (step 4); steps 6, 8 set " \
           "aside" in back.stdout, back.stdout[-2000:]
    assert sorted(p.name for p in (run / "rolled-back").iterdir()) == ["step-00000006", "step-00000008"]
    assert losses(run) == first and sorted(losses(run)) == list(range(1, 9))  # 5-8 again, bit for bit
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert (rollback["from_step"], rollback["to_step"], rollback["set_aside"], rollback["resume"]) == (8, 4, [6, 8], "4")

    again = cli(*train_args(tiny_data, str(run), "max_steps=10", "checkpoint.resume=4"))  # a requeue: goes on
    assert again.returncode == 0 and f"resuming from {run}/checkpoints/step-00000008 (step 8)" in again.stdout
    one_line_error(cli(*train_args(tiny_data, str(tmp_path / "other"), "checkpoint.resume=6")),
                   "has no checkpoint of step 6; its checkpoints: none")
    (run / "checkpoints" / "step-00000006").rename(run / "moved")  # 6 is only in rolled-back/ now
    one_line_error(cli(*train_args(tiny_data, str(run), "max_steps=10", "checkpoint.resume=6")),
                   "no checkpoint of step 6 (it is in rolled-back/: move it back into checkpoints/")


def test_train_epochs_sets_the_steps_from_the_data(tmp_path, tiny_data):
    """train.epochs=0.05 of the tiny corpus: max_steps is the steps that pass over 5% of its train windows, said at
    start-up and written to config.yaml; the run ends there, its last epoch just past 0.05."""
    windows = data.Split(tiny_data, "train", 32).num_windows  # TINY: 32 tokens, 8 sequences per step
    expected = math.ceil(0.05 * windows / 8)
    run = tmp_path / "run"
    result = cli(*train_args(tiny_data, str(run), "train.epochs=0.05", "checkpoint.interval=0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"train.epochs=0.05: {windows:,} sequences of 32 tokens make a pass, 8 per step: "
            f"train.max_steps={expected:,}") in result.stdout
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["step"] == expected and 0.05 <= rows[-1]["epoch"] < 0.05 + 8 / windows
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["epochs"], saved["max_steps"]) == (0.05, expected)
    one_line_error(cli(*train_args(tiny_data, str(run), "train.epochs=-1")), "'train.epochs' must not be negative")


def test_a_resume_that_would_not_be_exact_is_refused_unless_accepted(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=2")).returncode == 0
    one_line_error(cli(*train_args(tiny_data, str(run), "max_steps=4", "train.seed=7", "train.batch_tokens=512")),
                   "would not continue the same run", "train.seed 1337 -> 7", "train.batch_tokens 256 -> 512",
                   "checkpoint.allow_changes=batch,seed")
    # Other input prepared with the same tokenizer: the checkpoint knows it is not its data.
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("Call me Ishmael. " * 4000)
    assert cli("prepare", str(tmp_path / "other.txt"), "--out", str(other), "--val-fraction", "0.1").returncode == 0
    one_line_error(cli(*train_args(str(other), str(run), "max_steps=4")), "is not the checkpoint's",
                   "checkpoint.allow_changes=data")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]  # nothing was touched

    accepted = cli(*train_args(tiny_data, str(run), "max_steps=4", "train.seed=7", "optim.lr=1e-3",
                               "checkpoint.allow_changes=seed"))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "resume: settings changed since the checkpoint: optim.lr 0.003 -> 0.001" in accepted.stdout
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["accepted"] for e in events if e["event"] == "changed"] == [["train.seed 1337 -> 7"]]
