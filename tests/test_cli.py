"""The `raychat` command, run as a user runs it: in a subprocess."""
import json
import subprocess
import sys

import pytest

from raychat.cli import COMMANDS


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raychat.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_the_stages():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in ("tokenizer", "train", "eval", "serve", "chat", "data", "config"):
        assert stage in out.stdout


@pytest.mark.parametrize("command", sorted({" ".join(filter(None, key)) for key in COMMANDS}))
def test_every_subcommand_has_help(command):
    out = run_cli(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "--set" in out.stdout


def test_config_show_prints_the_effective_config():
    out = run_cli("config", "show", "--preset", "d20", "--set", "pretrain.depth=26")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["preset"] == "d20" and shown["pretrain"]["depth"] == 26


def test_bad_override_is_one_line_without_traceback():
    out = run_cli("config", "show", "--set", "pretrain.depth=-3")
    assert out.returncode == 2
    assert out.stderr.strip() == "raychat: error: pretrain.depth must be >= 1 and <= 128, got -3"
    assert "Traceback" not in out.stderr
