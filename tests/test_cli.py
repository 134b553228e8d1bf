"""The command line imports only the module of the command it runs, and still shows every command's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt_train.cli import COMMANDS
from helpers import REPO, cli


def imported_after(*argv: str) -> set[str]:
    """The gpt_train and torch modules a fresh interpreter holds after the CLI has handled `argv`."""
    script = ("import sys\nfrom gpt_train.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print(' '.join(m for m in sys.modules if m == 'torch' or m.startswith('gpt_train.')))")
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split("\n")[-2].split())


def test_status_help_does_not_import_torch_or_other_commands():
    loaded = imported_after("status", "--help")
    assert "torch" not in loaded
    assert "gpt_train.status" in loaded
    assert ({module for module, _ in COMMANDS.values()} - {"gpt_train.status"}) & loaded == set()


def test_status_of_a_run_does_not_import_torch(tmp_path):
    # A login node or a laptop reading a run's records should not pay torch's import (seconds on a cold disk).
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "MANIFEST.json").write_text("{}")
    (run / "checkpoints" / "step-00000002" / "meta.json").write_text('{"step": 2, "tokens": 512}')
    (run / "events.jsonl").write_text('{"event": "start", "step": 0, "time": 1}\n')
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 9.5, "time": 2}\n')
    loaded = imported_after("status", str(run))
    assert "torch" not in loaded and "gpt_train.status" in loaded


def test_top_level_help_lists_every_command_without_importing_one():
    assert {module for module, _ in COMMANDS.values()} & imported_after("--help") == set()
    result = cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps long help lines
    for name, (_, help_text) in COMMANDS.items():
        assert f"{name} {help_text}" in text


@pytest.mark.parametrize("command, option", [("train", "overrides"), ("status", "--json"), ("eval", "--task")])
def test_command_help_shows_its_own_arguments(command, option):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert option in result.stdout


def test_unknown_command_is_a_usage_error():
    result = cli("trian")
    assert result.returncode == 2 and "invalid choice: 'trian'" in result.stderr
