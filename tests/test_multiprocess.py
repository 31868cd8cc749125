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


def _xla_flags(devices):
  """This session's XLA flags (conftest's VIDSIM_TEST_XLA_FLAGS) with a process's own device count."""
  return f"{os.environ.get('VIDSIM_TEST_XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def run_processes(args, count, devices_per_process, env=None, timeout=600):
  """Runs `python -m vidsim ARGS` as `count` jax processes; returns their CompletedProcess-likes."""
  port = _free_port()
  procs = []
  for pid in range(count):
    process_env = dict(os.environ, **(env or {}))
    process_env.update(
        XLA_FLAGS=_xla_flags(devices_per_process),
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
  process_env.update(XLA_FLAGS=_xla_flags(devices), JAX_PLATFORMS="cpu")
  for var in ("VIDSIM_COORDINATOR", "VIDSIM_NUM_PROCESSES", "VIDSIM_PROCESS_ID"):
    process_env.pop(var, None)
  return subprocess.run([sys.executable, "-m", "vidsim", *args], env=process_env, capture_output=True, text=True)


def test_two_processes_train_like_one_and_resume_onto_other_layouts(tmp_path, repo_root, shared_compile_cache):
  """2 processes x 4 devices <-> 1 process x 8 devices, 8 -> 4 devices, data=8 -> fsdp=4 x tensor=2.

  Each run trains 2 steps, then another layout resumes it to 4. The batches are the
  same whatever the layout (the pixel pipeline plans global batches), so every resumed
  run must log the same losses as a reference that never changed layout.
  """
  import shutil

  data_env = {"VIDSIM_DATA_DIR": str(tmp_path / "data")}
  config = str(repo_root / "experiments" / "digits_tiny.py")
  assert run_single(["data", "prepare", "--config", config], 8, data_env).returncode == 0
  # One bucket: one compilation per run keeps this test to minutes.
  common = ["--config", config, "--config.vae_train.recon_every=0", "--config.vae_train.final_eval=false",
            "--config.peak_flops_per_device=1e10", "--config.checkpoint.async_save=false",
            "--config.data.buckets=((5, 16, 16),)", *shared_compile_cache]
  first = [*common, "--config.vae_train.steps=2"]
  second = [*common, "--config.vae_train.steps=4"]

  def check(result):
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else (result[0], result[2])
    assert code == 0, err[-3000:]

  def train(workdir, args, processes=1, devices=8):
    if processes == 1:
      check(run_single(["train-vae", "--workdir", str(workdir), *args], devices, data_env))
      return []
    results = run_processes(["train-vae", "--workdir", str(workdir), *args], processes, devices, data_env)
    for result in results:
      check(result)
    return results

  train(tmp_path / "ref", first)
  for name in ("to_two", "to_four_devices", "to_fsdp_tensor"):
    shutil.copytree(tmp_path / "ref", tmp_path / name)
  results = train(tmp_path / "from_two", first, processes=2, devices=4)
  assert "[p1/2]" in results[1][2]  # Log lines of process 1 carry its index.

  train(tmp_path / "ref", second)
  train(tmp_path / "to_two", second, processes=2, devices=4)
  train(tmp_path / "from_two", second)
  train(tmp_path / "to_four_devices", second, devices=4)
  train(tmp_path / "to_fsdp_tensor", [*second, "--config.mesh.ici.data=1", "--config.mesh.ici.fsdp=4",
                                      "--config.mesh.ici.tensor=2"])

  reference = read_metrics(tmp_path / "ref" / "vae" / "metrics.jsonl")
  assert [r["step"] for r in reference] == [1, 2, 3, 4]
  # Two processes see the same global batches as one: same losses from the first step.
  two = read_metrics(tmp_path / "from_two" / "vae" / "metrics.jsonl")
  for a, b in zip(reference[:2], two[:2]):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
  assert sorted(p.name for p in (tmp_path / "from_two" / "vae" / "checkpoints" / "2" / "data_iter").iterdir()
                if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]
  for name in ("to_two", "from_two", "to_four_devices", "to_fsdp_tensor"):
    rows = read_metrics(tmp_path / name / "vae" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4], name
    for a, b in zip(reference[2:], rows[2:]):
      assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (name, a["step"])


def test_dit_stage_resumes_onto_other_process_counts_and_meshes_with_the_same_batches(tmp_path, repo_root,
                                                                                     shared_compile_cache):
  """The DiT's packed-latent stream is planned globally, so its state is one stream position:
  1 process x 8 devices -> 2 processes x 4 devices, and 2 x 4 -> 1 x 8 with data=8 ->
  fsdp=4 x tensor=2, both log the losses of an uninterrupted one-process run."""
  import json
  import shutil

  data_env = {"VIDSIM_DATA_DIR": str(tmp_path / "data")}
  config = str(repo_root / "experiments" / "digits_tiny.py")
  common = ["--config", config, "--config.peak_flops_per_device=1e10", "--config.checkpoint.async_save=false",
            *shared_compile_cache]

  def check(result):
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else (result[0], result[2])
    assert code == 0, err[-3000:]

  def run(command, workdir, args=(), processes=1, devices=8):
    argv = [command, "--workdir", str(workdir), *common, *args]
    if processes == 1:
      check(run_single(argv, devices, data_env))
    else:
      for result in run_processes(argv, processes, devices, data_env):
        check(result)

  # A 1-step VAE and its latent cache of mixed shapes (three buckets): the input of every run.
  base = tmp_path / "base"
  check(run_single(["data", "prepare", "--config", config], 8, data_env))
  run("train-vae", base, ["--config.vae_train.steps=1", "--config.vae_train.recon_every=0",
                          "--config.vae_train.final_eval=false"])
  run("encode", base)
  manifest = json.loads((base / "latents" / "manifest.json").read_text())
  assert len(manifest["splits"]["train"]["latent_shapes"]) > 1

  first, second = ["--config.train.steps=2"], ["--config.train.steps=4"]  # Checkpoints every 2 steps.
  shutil.copytree(base, tmp_path / "ref")
  shutil.copytree(base, tmp_path / "from_two")
  run("train", tmp_path / "ref", second)  # Uninterrupted, on one process.
  # A copy of it as if stopped after step 2's checkpoint.
  shutil.copytree(tmp_path / "ref", tmp_path / "to_two")
  shutil.rmtree(tmp_path / "to_two" / "dit" / "checkpoints" / "4")
  run("train", tmp_path / "from_two", first, processes=2, devices=4)
  saved = tmp_path / "from_two" / "dit" / "checkpoints" / "2" / "data_iter"
  states = {p.read_text() for p in saved.glob("process_*-of-2.json")}
  assert len(states) == 1  # One global position, the same in both processes.

  run("train", tmp_path / "to_two", second, processes=2, devices=4)
  run("train", tmp_path / "from_two",
      [*second, "--config.mesh.ici.data=1", "--config.mesh.ici.fsdp=4", "--config.mesh.ici.tensor=2"])

  reference = read_metrics(tmp_path / "ref" / "dit" / "metrics.jsonl")
  assert [r["step"] for r in reference] == [1, 2, 3, 4]
  for name in ("to_two", "from_two"):
    rows = read_metrics(tmp_path / name / "dit" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4], name
    for a, b in zip(reference, rows):
      # Other layouts reduce in other orders (tensor=2 splits the matmuls): ~1e-4 apart
      # after 4 steps. Another batch would be off by percents.
      assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (name, a["step"])
  # After 4 batches every run, on any layout, stands at the same stream position.
  positions = {p.read_text() for name in ("ref", "to_two", "from_two")
               for p in (tmp_path / name / "dit" / "checkpoints" / "4" / "data_iter").glob("process_*.json")}
  assert len(positions) == 1 and json.loads(positions.pop())["position"] > 0
