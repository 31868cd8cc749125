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


def test_bench_dit_rows_that_do_not_split_over_the_devices_exit_2(repo_root):
  # conftest's XLA_FLAGS give the subprocess 8 CPU devices: 3 rows cannot split over them.
  out = _vidsim("bench", "dit", "--config", str(repo_root / "experiments/digits_tiny.py"),
                "--config.train.rows_per_batch=3")
  assert out.returncode == 2
  assert "train.rows_per_batch=3 must be a multiple of 8" in out.stderr


def test_bench_vae_times_the_batch_the_pipeline_makes_for_the_devices(repo_root, tmp_path):
  # 12 clips over 8 devices: the training pipeline makes batches of 8, and so does the bench.
  out = _vidsim("bench", "vae", "--config", str(repo_root / "experiments/digits_tiny.py"), "--out", str(tmp_path / "b.json"),
                "--config.data.batch_size=12", "--config.bench.warmup=1", "--config.bench.steps=1")
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads((tmp_path / "b.json").read_text())
  assert report["devices"] == 8 and report["clips_per_step"] == 8
