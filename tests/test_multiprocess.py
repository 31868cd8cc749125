"""Two jax processes on loopback (gloo CPU collectives): the same code path as a pod."""

import os
import socket
import subprocess
import sys

import pytest

from vidsim.train.metrics import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(args, count, devices_per_process, env=None, timeout=600):
  """Runs `python -m vidsim ARGS` as `count` jax processes; returns their CompletedProcess-likes."""
  port = _free_port()
  procs = []
  for pid in range(count):
    process_env = dict(os.environ, **(env or {}))
    process_env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
        VIDSIM_COORDINATOR=f"127.0.0.1:{port}",
        VIDSIM_NUM_PROCESSES=str(count),
        VIDSIM_PROCESS_ID=str(pid),
    )
    procs.append(subprocess.Popen([sys.executable, "-m", "vidsim", *args], env=process_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    results.append((proc.returncode, out, err))
  return results


def run_single(args, devices, env=None):
  process_env = dict(os.environ, **(env or {}))
  process_env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  for var in ("VIDSIM_COORDINATOR", "VIDSIM_NUM_PROCESSES", "VIDSIM_PROCESS_ID"):
    process_env.pop(var, None)
  return subprocess.run([sys.executable, "-m", "vidsim", *args], env=process_env, capture_output=True, text=True)


def test_two_processes_train_the_vae_like_one_process(tmp_path, repo_root):
  data_env = {"VIDSIM_DATA_DIR": str(tmp_path / "data")}
  config = str(repo_root / "experiments" / "digits_tiny.py")
  prepared = run_single(["data", "prepare", "--config", config], 8, data_env)
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  common = ["--config", config, "--config.vae_train.steps=2", "--config.vae_train.recon_every=0",
            "--config.peak_flops_per_device=1e10", "--config.checkpoint.async_save=false"]

  results = run_processes(["train-vae", "--workdir", str(tmp_path / "two"), *common], 2, 4, data_env)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert "[p1/2]" in results[1][2]  # Non-chief log lines carry their process index.

  single = run_single(["train-vae", "--workdir", str(tmp_path / "one"), *common], 8, data_env)
  assert single.returncode == 0, single.stderr[-3000:]
  two = read_metrics(tmp_path / "two" / "vae" / "metrics.jsonl")
  one = read_metrics(tmp_path / "one" / "vae" / "metrics.jsonl")
  # Same global batches, same mesh shape (data=8): the same losses up to float reassociation.
  assert [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
  assert sorted(p.name for p in (tmp_path / "two" / "vae" / "checkpoints" / "2" / "data_iter").iterdir()
                if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]
