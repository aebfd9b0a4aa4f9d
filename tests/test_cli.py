"""The `dbrx-train` entry point: every subcommand reaches its script with the script's flags."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from dbrx_train.cli import COMMANDS, REPO

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dbrx_train.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_console_script_is_registered():
    [ep] = [ep for ep in entry_points(group="console_scripts") if ep.name == "dbrx-train"]
    assert ep.value == "dbrx_train.cli:main"


def test_help_lists_every_command_and_fits_a_screen():
    out = cli("--help")
    assert out.returncode == 0
    for name in ("train", *COMMANDS):
        assert f"  {name}" in out.stdout
    assert len(out.stdout.splitlines()) <= 24 and max(map(len, out.stdout.splitlines())) <= 100


def test_every_command_points_at_an_existing_script():
    for script, _ in COMMANDS.values():
        assert (REPO / script).is_file(), script


def test_stats_runs_the_script_with_its_flags():
    out = cli("stats", "yamls/pretrain/dbrx-132b.yaml", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert abs(stats["total_params"] / 131.6e9 - 1) < 0.005
    assert abs(stats["active_params"] / 36.5e9 - 1) < 0.01


def test_unknown_command_names_the_choices():
    out = cli("trian")
    assert out.returncode != 0
    assert "unknown command 'trian'" in out.stderr and "prep-default" in out.stderr
