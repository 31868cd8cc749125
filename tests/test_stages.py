"""The stages chained on the tiny config: train-vae -> encode -> train, as a user runs them."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vidsim import config as config_lib
from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def _tiny(repo_root, **overrides):
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  return config_lib.load_config(str(repo_root / "experiments" / "digits_tiny.py"), args)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
  """A workdir with a 4-step tiny VAE and its data (built once for this module)."""
  from vidsim.data import commands
  from vidsim.train.vae_loop import train_vae

  root = tmp_path_factory.mktemp("stages")
  os.environ["VIDSIM_DATA_DIR"] = str(root / "data")
  repo = __import__("pathlib").Path(__file__).resolve().parent.parent
  config = _tiny(repo, peak_flops_per_device=1e10)
  commands.prepare(config)
  mesh = mesh_lib.make_mesh(config)
  train_vae(config, root / "work", mesh)
  return root / "work", config


def test_vae_stage_writes_metrics_recon_and_latent_stats(trained_vae):
  workdir, config = trained_vae
  rows = read_metrics(workdir / "vae" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("loss", "recon", "kl", "psnr", "step_time_s", "clips_per_s", "mfu"):
    assert key in rows[-1], key
  assert list((workdir / "vae" / "recon").glob("step_*.gif"))
  assert json.loads((workdir / "config.json").read_text())["vae"] == config.vae.to_dict() | {
      "widths": list(config.vae.widths)}
  from vidsim.trained import TrainedVAE

  vae = TrainedVAE(config, workdir, mesh_lib.make_mesh(config))
  assert vae.step == 4
  assert np.all(vae.scale > 0) and not np.allclose(vae.scale, 1.0)  # Computed from data.


def test_vae_evaluation_covers_every_record_of_the_split_once(trained_vae, repo_root):
  """train-vae ends with a whole-split PSNR; batching does not change it (pooled per
  value, every record once); `vidsim eval-vae` prints the same figure."""
  from vidsim.data import pipeline
  from vidsim.eval.vae import evaluate_split

  workdir, config = trained_vae
  written = json.loads((workdir / "eval" / "vae_psnr_validation.json").read_text())
  assert written["clips"] == len(pipeline.data_source(config, "validation")) == 16
  assert sum(b["clips"] for b in written["per_bucket"].values()) == 16
  assert "1x16x16" in written["per_bucket"]  # The split's images are evaluated too.
  one_at_a_time = evaluate_split(_tiny(repo_root, **{"data.batch_size": 1}), workdir, mesh_lib.make_mesh(config),
                                 "validation")
  assert one_at_a_time["psnr_db"] == pytest.approx(written["psnr_db"], abs=2e-3)
  assert 0 < written["psnr_db"] < 60  # A 4-step VAE: about 5 dB.
  run = subprocess.run([sys.executable, "-m", "vidsim", "eval-vae", "--config",
                        str(repo_root / "experiments/digits_tiny.py"), "--workdir", str(workdir)],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout)["psnr_db"] == written["psnr_db"]


def _encode_cmd(workdir, repo_root, per_shard):
  return [sys.executable, "-m", "vidsim", "encode", "--config", str(repo_root / "experiments/digits_tiny.py"),
          "--workdir", str(workdir), f"--config.encode.examples_per_shard={per_shard}", "--config.encode.batch_size=2"]


def _cache_ids(workdir, split):
  manifest = latents_lib.load_manifest(workdir)
  source = latents_lib.cache_source(workdir, split, manifest)
  return sorted(int(latents_lib.read_record(source[i])["index"]) for i in range(len(source))), manifest


def test_encode_survives_sigkill_without_duplicates_or_gaps(trained_vae, repo_root):
  workdir, _ = trained_vae
  env = dict(os.environ)
  proc = subprocess.Popen(_encode_cmd(workdir, repo_root, per_shard=2), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  cache = workdir / "latents"
  # A shard being written is `train-N.tmp-<pid>.array_record` until it is renamed.
  shards = lambda: [p for p in cache.glob("train-*.array_record") if ".tmp-" not in p.name]
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if len(shards()) >= 3:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "encode finished before it could be killed"
  assert not (cache / "manifest.json").exists()
  done_before = len(shards())
  assert 3 <= done_before < 32

  rerun = subprocess.run(_encode_cmd(workdir, repo_root, per_shard=2), env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"{32 - done_before} to encode, {done_before} already done" in rerun.stderr
  ids, manifest = _cache_ids(workdir, "train")
  assert ids == list(range(64))  # Every example once: no duplicates, no gaps.
  assert manifest["splits"]["train"]["num_examples"] == 64
  assert not list(cache.glob("*.tmp-*"))


class _CompileLog(logging.Handler):
  """Collects jax's "Compiling <fn> ..." log lines while active (with jax.log_compiles)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.messages.append(message[:120])

  def count(self, function_name):
    return sum(message.split()[1] in (function_name, f"jit({function_name})") for message in self.messages)

  def __enter__(self):
    logging.getLogger("jax").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("jax").removeHandler(self)


def test_dit_trains_on_the_cache_and_refuses_another_vaes_cache(trained_vae):
  from vidsim.train.dit_loop import train_dit

  workdir, config = trained_vae
  mesh = mesh_lib.make_mesh(config)
  if not (workdir / "latents" / "manifest.json").exists():
    latents_lib.encode_cache(config, workdir, mesh)
  compiles = _CompileLog()
  with jax.log_compiles(True), compiles:
    state = train_dit(config, workdir, mesh)
  assert int(state["step"]) == config.train.steps
  # Videos and images of several shapes, packed differently each step, one compiled step.
  train_split = json.loads((workdir / "latents" / "manifest.json").read_text())["splits"]["train"]
  assert len(train_split["latent_shapes"]) >= 3
  assert compiles.count("train_step") == 1, compiles.messages
  rows = read_metrics(workdir / "dit" / "metrics.jsonl")
  assert rows[-1]["step"] == config.train.steps
  for key in ("loss", "loss_t00_25", "grad_norm", "tokens_per_s", "mfu", "packing_efficiency", "flops_per_step"):
    assert key in rows[-1], key
  assert 0.3 < rows[-1]["packing_efficiency"] <= 1.0

  manifest_path = workdir / "latents" / "manifest.json"
  original = manifest_path.read_text()
  manifest = json.loads(original)
  manifest["vae_fingerprint"] = "0000000000000000"
  manifest_path.write_text(json.dumps(manifest))
  try:
    with pytest.raises(UsageError, match="made by VAE 0000000000000000"):
      train_dit(config, workdir, mesh)
  finally:
    manifest_path.write_text(original)


def test_held_out_loss_is_logged_and_repeatable(trained_vae, repo_root, tmp_path):
  import shutil

  from vidsim.models.build import abstract_dit
  from vidsim.train import dit_hooks
  from vidsim.train.dit_loop import train_dit

  source, _ = trained_vae
  mesh = mesh_lib.make_mesh(_tiny(repo_root))
  # eval_every 2 and log_every 4: step 2 has an eval row of its own, step 4 (logged) merges both.
  config = _tiny(repo_root, peak_flops_per_device=1e10,
                 **{"train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 4})
  if not (source / "latents" / "manifest.json").exists():
    latents_lib.encode_cache(config, source, mesh)
  workdir = tmp_path / "work"
  for stage in ("vae", "latents"):
    shutil.copytree(source / stage, workdir / stage)
  state = train_dit(config, workdir, mesh)

  rows = {r["step"]: r for r in read_metrics(workdir / "dit" / "metrics.jsonl")}
  assert sorted(rows) == [2, 4]
  assert "loss" not in rows[2] and "loss" in rows[4]
  names = [f"{kind}_{dit_hooks.time_name(t)}" for t in dit_hooks.EVAL_TIMES
           for kind in ("val_loss", "train_loss", "val_caption_gain", "val_direction_gain", "val_digit_gain")]
  for step in (2, 4):
    assert all(np.isfinite(rows[step][k]) for k in names + ["val_loss"]), rows[step]
    assert rows[step]["val_loss"] == pytest.approx(
        np.mean([rows[step][f"val_loss_{dit_hooks.time_name(t)}"] for t in dit_hooks.EVAL_TIMES]))
  assert rows[2]["val_loss_t90"] != rows[4]["val_loss_t90"]  # The EMA weights moved.

  # Same weights, same batches and noise: the same numbers, from a hook built afresh.
  with mesh_lib.activate(mesh, config):
    graphdef = abstract_dit(config, mesh)[0]
    manifest = latents_lib.load_manifest(workdir)
    hook = dit_hooks.HeldOutLoss(config, workdir, mesh, graphdef, manifest)
    again = hook(state, 4)
  for k in names:
    assert again[k] == pytest.approx(rows[4][k], rel=1e-5, abs=1e-6), k

  # Counterfactual captions change only the caption bytes; rewriting with the identity changes nothing.
  batch = hook.batches["val"][0]
  same = dit_hooks.recaption(batch, lambda caption: caption)
  np.testing.assert_array_equal(same["text_tokens"], batch["text_tokens"])
  np.testing.assert_array_equal(same["text_mask"], batch["text_mask"])
  flipped = hook.counterfactuals["direction"][0]
  assert not np.array_equal(flipped["text_tokens"], batch["text_tokens"])
  np.testing.assert_array_equal(flipped["tokens"], batch["tokens"])

  # A cache without the eval split turns the measure off with a warning, not an error.
  no_val = dict(manifest, splits={"train": manifest["splits"]["train"]})
  assert dit_hooks.held_out_hooks(config, workdir, mesh, graphdef, no_val) == []


def test_sigterm_saves_at_the_next_step_and_exits_0_then_resumes(trained_vae, repo_root, tmp_path):
  _, config = trained_vae
  workdir = tmp_path / "preempted"
  cmd = lambda steps: [
      sys.executable, "-m", "vidsim", "train-vae", "--config", str(repo_root / "experiments/digits_tiny.py"),
      "--workdir", str(workdir), f"--config.vae_train.steps={steps}", "--config.vae_train.checkpoint_every=1000",
      "--config.vae_train.recon_every=0", "--config.vae_train.final_eval=false", "--config.peak_flops_per_device=1e10",
      "--config.data.buckets=((5, 16, 16),)"]
  proc = subprocess.Popen(cmd(500), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "vae" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(read_metrics(metrics)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted (SIGTERM)" in err
  saved = sorted(int(p.name) for p in (workdir / "vae" / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 500
  resumed = subprocess.run(cmd(saved[0] + 2), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resuming from step {saved[0]}" in resumed.stderr


def test_init_from_loads_weights_and_names_mismatches(trained_vae, repo_root, tmp_path):
  from vidsim.train.vae_loop import train_vae
  from vidsim.trained import TrainedVAE

  source, config = trained_vae
  mesh = mesh_lib.make_mesh(config)
  fresh = _tiny(repo_root, init_from=str(source), peak_flops_per_device=1e10, **{"vae_train.steps": 0})
  state = train_vae(fresh, tmp_path / "fine_tune", mesh)
  expected = TrainedVAE(config, source, mesh).params
  for got, want in zip(jax_leaves(state["ema"]), jax_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), want)

  wider = _tiny(repo_root, init_from=str(source), **{"vae_train.steps": 0, "vae.widths": "(8, 16, 32)"})
  with pytest.raises(UsageError, match=r"does not fit this model(.|\n)*checkpoint \(.*\) vs model \("):
    train_vae(wider, tmp_path / "wider", mesh)


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def test_sigkill_at_any_moment_then_resume_is_bit_exact(trained_vae, repo_root, tmp_path):
  """SIGKILL mid-run (saves every 2 steps, so often during an async save), resume, and
  end with the same weights, bit for bit, and the same losses as an uninterrupted run."""
  from vidsim.trained import TrainedVAE

  _, config = trained_vae
  args = ["--config.vae_train.steps=12", "--config.vae_train.checkpoint_every=2", "--config.vae_train.log_every=1",
          "--config.vae_train.recon_every=0", "--config.vae_train.final_eval=false", "--config.peak_flops_per_device=1e10",
          "--config.data.buckets=((5, 16, 16),)"]

  def cmd(workdir):
    return [sys.executable, "-m", "vidsim", "train-vae", "--config", str(repo_root / "experiments/digits_tiny.py"),
            "--workdir", str(workdir), *args]

  straight = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True)
  assert straight.returncode == 0, straight.stderr[-2000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = killed / "vae" / "metrics.jsonl"
  checkpoints = killed / "vae" / "checkpoints"
  committed = lambda: checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    # Saves are async: wait for one to commit, so the resume has something to resume from.
    if metrics.exists() and len(read_metrics(metrics)) >= 5 and committed():
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = subprocess.run(cmd(killed), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step" in resumed.stderr

  configured = _tiny(repo_root, **{"vae_train.steps": 12, "data.buckets": "((5, 16, 16),)"})
  mesh = mesh_lib.make_mesh(configured)
  a, b = TrainedVAE(configured, tmp_path / "straight", mesh), TrainedVAE(configured, killed, mesh)
  for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.scale, b.scale)
  losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(w / "vae" / "metrics.jsonl")]
  assert losses(tmp_path / "straight") == losses(killed)
  assert not (tmp_path / "straight" / "eval").exists()  # vae_train.final_eval=false: no whole-split pass.
