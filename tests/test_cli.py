"""The command line as a user meets it: exit codes and messages."""

import json
import subprocess
import sys

import pytest


def _vidsim(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "vidsim", *args], capture_output=True, text=True, cwd=cwd)


def test_config_prints_resolved_json(repo_root):
  out = _vidsim("config", "--config", str(repo_root / "experiments/digits_tiny.py"), "--config.dit.depth=3")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["dit"]["depth"] == 3


def test_unknown_key_exits_2_naming_key_and_closest(repo_root):
  out = _vidsim("config", "--config", str(repo_root / "experiments/digits_tiny.py"), "--config.dit.no_such_key=1")
  assert out.returncode == 2
  assert "dit.no_such_key" in out.stderr and "closest valid keys" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["config", "--config", "missing.py"], "not found"),
        (["config"], "--config"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2(args, message):
  out = _vidsim(*args)
  assert out.returncode == 2
  assert message in out.stderr


def test_bench_dit_segments_out_of_range_exits_2(repo_root):
  out = _vidsim("bench", "dit", "--config", str(repo_root / "experiments/digits_tiny.py"), "--config.bench.segments_per_row=0")
  assert out.returncode == 2
  assert "bench.segments_per_row=0: use 1 to 8" in out.stderr
