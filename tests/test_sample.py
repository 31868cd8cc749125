"""Generation on a tiny randomly initialised DiT + VAE saved as a workdir: every task's
shapes, given latent frames kept exactly, seeds, output files, and bad input (exit 2)."""

import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from vidsim import cli
from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim import demo, sizes
from vidsim.sample import engine as sample
from vidsim.train import dit_hooks
from vidsim.data import video_io
from vidsim.errors import UsageError
from vidsim.models import dit as dit_lib
from vidsim.models import vae as vae_lib
from vidsim.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = dict(height=16, width=16)
FAST = dict(steps=2, sampler="euler", guidance=3.0)


def _save(directory, state):
  checkpointer = Checkpointer(directory, async_save=False)
  data_iter = iter(grain.MapDataset.range(2).to_iter_dataset())
  checkpointer.save(1, state, data_iter, {}, {}, force=True)
  checkpointer.close()


@pytest.fixture(scope="module")
def config():
  return config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"))


def _random_params(build, seed):
  """Random weights of a model's param tree, from its shapes alone: initialising the
  real model op by op on 8 fake devices costs tens of seconds on a loaded 2-core CPU,
  and the DiT's zero-init output layers would make every velocity 0."""
  shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(build), nnx.Param)[1])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, config):
  """A workdir holding a random VAE and a random DiT as stage checkpoints."""
  root = tmp_path_factory.mktemp("sample_workdir")
  params = _random_params(lambda: dit_lib.DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0)), 1)
  _save(root / "dit" / "checkpoints", {"ema": params})
  vae_params = _random_params(lambda: vae_lib.VideoVAE(config.vae, rngs=nnx.Rngs(0)), 2)
  channels = config.vae.latent_channels
  _save(root / "vae" / "checkpoints", {
      "ema": vae_params,
      "latent_shift": np.full((channels,), 0.1, np.float32),
      "latent_scale": np.full((channels,), 0.5, np.float32),
  })
  return root


@pytest.fixture(scope="module")
def engine(config, workdir):
  return sample.Engine.from_workdir(config, str(workdir), mesh_lib.make_mesh(config))


@pytest.fixture(scope="module")
def clip():
  """A 9-frame source clip (uint8) that the VAE can encode."""
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)


def _encode(engine, video):
  return engine.encode(np.asarray(video)[None])[0]


def test_t2v_shapes_and_seeds(engine):
  a = sample.generate(engine, "t2v", ["a red 3", "a blue 7"], frames=9, seed=0, **SIZE, **FAST)
  assert a.videos.shape == (2, 9, 16, 16, 3) and a.videos.dtype == np.uint8
  assert a.latents.shape == (2, 3, 4, 4, 4) and not a.given.any()
  b = sample.generate(engine, "t2v", ["a red 3", "a blue 7"], frames=9, seed=0, **SIZE, **FAST)
  np.testing.assert_array_equal(a.latents, b.latents)
  c = sample.generate(engine, "t2v", ["a red 3", "a blue 7"], frames=9, seed=1, **SIZE, **FAST)
  assert np.abs(a.latents - c.latents).mean() > 1e-3
  assert np.abs(a.latents[0] - a.latents[1]).mean() > 1e-3  # Samples get their own noise.


def test_guidance_changes_the_output(engine):
  plain = sample.generate(engine, "t2v", ["a red 3"], frames=9, seed=0, **SIZE, steps=2, guidance=1.0)
  guided = sample.generate(engine, "t2v", ["a red 3"], frames=9, seed=0, **SIZE, **FAST)
  assert np.abs(plain.latents - guided.latents).mean() > 1e-4


def test_i2v_keeps_the_image_latent_exactly(engine, clip):
  g = sample.generate(engine, "i2v", ["x"], frames=9, image=clip[0], seed=0, **SIZE, **FAST)
  assert g.videos.shape == (1, 9, 16, 16, 3)
  np.testing.assert_array_equal(g.latents[0, 0], _encode(engine, clip[:1])[0])
  assert g.given.tolist() == [True] + [False] * 8
  again = sample.generate(engine, "i2v", ["x"], frames=9, image=clip[0], seed=0, **SIZE, **FAST)
  np.testing.assert_array_equal(g.videos, again.videos)
  other = sample.generate(engine, "i2v", ["x"], frames=9, image=clip[0], seed=3, **SIZE, **FAST)
  assert np.abs(g.latents[0, 1:] - other.latents[0, 1:]).mean() > 1e-3


@pytest.mark.parametrize("task", ["extend-forward", "extend-backward"])
def test_extend_keeps_the_source_and_reaches_the_length(engine, clip, task):
  g = sample.generate(engine, task, ["x"], frames=17, video=clip, seed=0, **SIZE, **FAST)
  assert g.videos.shape == (1, 17, 16, 16, 3) and g.latents.shape[1] == 5
  source = _encode(engine, clip)
  kept = g.latents[0, :3] if task == "extend-forward" else g.latents[0, 2:]
  np.testing.assert_array_equal(kept, source)
  assert g.given_latent.sum() == 3


def test_connect_holds_both_clips(engine, clip):
  second = clip[::-1].copy()
  g = sample.generate(engine, "connect", ["x"], frames=9, video=clip, video2=second, seed=0, **SIZE, **FAST)
  assert g.latents.shape == (1, 3, 4, 4, 4)
  np.testing.assert_array_equal(g.latents[0, 0], _encode(engine, clip)[-1])
  np.testing.assert_array_equal(g.latents[0, -1], _encode(engine, second)[0])
  assert g.given_latent.tolist() == [True, False, True]


def test_loop_and_edit(engine, clip):
  looped = sample.generate(engine, "loop", ["x"], frames=9, seed=0, **SIZE, **FAST)
  assert looped.latents.shape == (1, 5, 4, 4, 4)  # 3-frame clip + 2 bridge frames (as long as the clip moved).
  assert looped.videos.shape == (1, 16, 16, 16, 3)  # Less the clip's frame 0, where the bridge ends.
  assert looped.given.shape == (16,) and not looped.given.any()
  source = _encode(engine, clip)
  mild = sample.generate(engine, "edit", ["x"], frames=9, video=clip, strength=0.2, seed=0, **SIZE, **FAST)
  strong = sample.generate(engine, "edit", ["x"], frames=9, video=clip, strength=1.0, seed=0, **SIZE, **FAST)
  assert mild.latents.shape == source[None].shape
  # SDEdit from a low noise level stays nearer the source than from pure noise.
  assert np.abs(mild.latents[0] - source).mean() < np.abs(strong.latents[0] - source).mean()


def test_contact_sheet_marks_given_frames():
  videos = np.full((1, 3, 8, 8, 3), 100, np.uint8)
  sheet = video_io.contact_sheet(videos, np.array([True, False, False]), min_side=8)
  cell = 8 + 2 * video_io.SHEET_BORDER
  assert sheet.shape == (cell, 3 * cell, 3)
  assert tuple(sheet[0, 0]) == video_io.GIVEN_COLOR
  assert tuple(sheet[0, cell]) == video_io.GENERATED_COLOR and tuple(sheet[0, 2 * cell]) == video_io.GENERATED_COLOR
  assert tuple(sheet[cell // 2, cell // 2]) == (100, 100, 100)


def test_write_outputs_video_png_and_sheet(tmp_path, engine):
  g = sample.generate(engine, "t2v", ["a", "b"], frames=9, seed=0, **SIZE, **FAST)
  paths = video_io.write_outputs(str(tmp_path / "o.mp4"), g.videos, g.given, fps=8.0)
  assert [os.path.basename(p) for p in paths] == ["o_0.mp4", "o_1.mp4", "o.sheet.png"]
  frames, _ = video_io.read_video(paths[0])
  assert frames.shape == (9, 16, 16, 3)
  assert video_io.read_image(paths[2]).shape[0] == 2 * (64 + 2 * video_io.SHEET_BORDER)  # Two rows, frames upscaled.
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_check_size_names_nearest_valid_sizes(config):
  assert sizes.check_output_size(config, 9, 16, 24) == (3, 4, 6, 4)
  with pytest.raises(UsageError, match=r"--frames 6 -> nearest valid: 5 or 9"):
    sizes.check_output_size(config, 6, 16, 16)
  with pytest.raises(UsageError, match=r"--width 20 -> nearest valid: 16 or 24"):
    sizes.check_output_size(config, 9, 16, 20)


def _cli(tmp_path, workdir, *flags):
  return ["sample", "--config", os.path.join(ROOT, "experiments", "digits_tiny.py"), "--workdir", str(workdir),
          "--prompt", "a red 3", "--steps", "2", *flags]


@pytest.mark.slow  # A second engine from the workdir: compiles the ODE and decoder again (~20 s).
def test_cli_writes_video_and_sheet(tmp_path, workdir, capsys):
  out = tmp_path / "t2v.gif"
  assert cli.main(_cli(tmp_path, workdir, "--out", str(out), "--frames", "9", "--sampler", "heun")) == 0
  assert out.exists() and (tmp_path / "t2v.sheet.png").exists()
  image = tmp_path / "still.png"
  assert cli.main(_cli(tmp_path, workdir, "--out", str(image), "--frames", "1")) == 0
  assert video_io.read_image(image).shape == (16, 16, 3)


@pytest.mark.parametrize("flags,message", [
    (["--image", "missing.png"], "input image not found"),
    (["--task", "edit"], "needs --video"),
    (["--video2", "CORRUPT"], "--video2 is the second clip"),
    (["--task", "edit", "--video", "CORRUPT"], "cannot read video"),
    (["--task", "edit", "--video", "CLIP", "--strength", "1.5"], "strength must be in"),
    (["--frames", "6"], "nearest valid: 5 or 9"),
    (["--height", "18"], "nearest valid: 16 or 24"),
    (["--task", "extend-forward", "--video", "CLIP", "--frames", "9"], "extended length"),
    (["--frames", "1"], "write it as PNG"),
    (["--image", "ODD_IMAGE"], "the input's frames are 15x15 (HxW)"),
    (["--steps", "0"], "must be >= 1"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, workdir, clip, capsys, flags, message):
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"not a video at all")
  good = tmp_path / "clip.mp4"
  video_io.write_video(good, clip, 8.0)
  odd = tmp_path / "odd.png"
  video_io.write_png(odd, clip[0, :15, :15])
  flags = [str(corrupt) if f == "CORRUPT" else str(good) if f == "CLIP" else str(odd) if f == "ODD_IMAGE" else
           str(tmp_path / f) if f == "missing.png" else f for f in flags]
  out = tmp_path / "out.mp4"
  assert cli.main(_cli(tmp_path, workdir, "--out", str(out), *flags)) == 2
  assert message in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == sorted(["corrupt.mp4", "clip.mp4", "odd.png"])


def test_cli_subprocess_exit_code(tmp_path, workdir):
  out = tmp_path / "o.mp4"
  result = subprocess.run(
      [sys.executable, "-m", "vidsim", *_cli(tmp_path, workdir, "--out", str(out), "--task", "connect",
                                             "--video", str(tmp_path / "nope.mp4"))],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 2, result.stderr
  assert "--video2" in result.stderr and not out.exists()


def test_training_samples_write_gifs_for_each_prompt(tmp_path, workdir, engine):
  # The sampling settings of the other tests, so the compiled ODE is reused.
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"), [
      "--config.sample.frames=9", "--config.sample.steps=2", "--config.sample.guidance=3.0"])
  dit_hooks.training_samples(config, str(workdir), engine.mesh, engine.dit_graphdef, {"ema": engine.dit_params}, 40)
  names = sorted(n for n in os.listdir(workdir / "dit" / "samples") if n.startswith("step_000040"))
  assert names == ["step_000040.sheet.png", "step_000040_0.gif", "step_000040_1.gif"]
  frames, _ = video_io.read_video(workdir / "dit" / "samples" / "step_000040_0.gif")
  assert frames.shape == (config.sample.frames, config.sample.height, config.sample.width, 3)


def test_training_samples_score_probe_prompts(workdir, engine):
  import json

  config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"), [
      "--config.sample.frames=9", "--config.sample.steps=2", "--config.sample.guidance=3.0",
      "--config.train.score_samples=4"])
  dit_hooks.training_samples(config, str(workdir), engine.mesh, engine.dit_graphdef, {"ema": engine.dit_params}, 41)
  lines = (workdir / "dit" / "samples" / "scores.jsonl").read_text().splitlines()
  row = json.loads(lines[-1])
  assert row["step"] == 41 and row["clips"] == 4
  assert all(0.0 <= row[k] <= 1.0 for k in ("digit", "color", "direction"))


def test_demo_probe_scores_writes_sheet_and_resumes(workdir):
  import json

  config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"), [
      "--config.sample.frames=9", "--config.sample.steps=2", "--config.sample.guidance=3.0"])
  mesh = mesh_lib.make_mesh(config)
  item, notes = demo.demo_probe(config, str(workdir), mesh, count=3)
  saved = json.loads((workdir / "eval" / "probe_scores.json").read_text())
  assert saved["samples"]["clips"] == 3 and len(saved["rows"]) == 3
  assert saved["true_clips"]["digit"] > 0.5  # The scorer reads true 16x16 clips of digit_size 8.
  assert os.path.exists(item["output"]) and "3 one-digit probe prompts" in notes[0]
  stamp = os.path.getmtime(item["output"])
  assert demo.demo_probe(config, str(workdir), mesh, count=3) == (item, notes)  # Resume: read, not made again.
  assert os.path.getmtime(item["output"]) == stamp
  images = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"), ["--config.sample.frames=1"])
  assert demo.demo_probe(images, str(workdir), mesh) == (None, [])


@pytest.mark.slow  # Nine tasks with their own shapes: ~1 min of compiling on a 2-core CPU.
def test_demo_samples_make_every_task_and_resume(config, workdir):
  mesh = mesh_lib.make_mesh(config)
  items = demo.demo_samples(config, str(workdir), mesh)
  tasks = [item["task"] for item in items]
  assert sorted(set(tasks)) == sorted(["t2v", "t2i", "i2v", "extend-forward", "extend-backward", "loop", "edit",
                                       "connect"])
  assert tasks.count("t2v") == 3  # Square, wide and vertical.
  for item in items:
    assert os.path.exists(item["output"]) and os.path.exists(item["sheet"])
    assert all(os.path.exists(p) for p in item["inputs"])
  stamps = [os.path.getmtime(item["output"]) for item in items]
  assert demo.demo_samples(config, str(workdir), mesh) == items  # Resume: nothing made again.
  assert [os.path.getmtime(item["output"]) for item in items] == stamps


def test_tiled_decode_matches_plain_decode_in_time(config, engine):
  """encode.tile_frames decodes chunk by chunk with the causal state carried over: the
  same video as one pass (vae_tiling's temporal chunking is exact up to float order)."""
  tiled_config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"),
                                        ["--config.encode.tile_frames=4"])
  tiled = sample.Engine(tiled_config, engine.mesh, engine.dit_graphdef, engine.dit_params, engine.vae_graphdef,
                        engine.vae_params, engine.shift, engine.scale)
  latents = np.random.default_rng(0).standard_normal((1, 3, 4, 4, 4)).astype(np.float32)
  plain, chunked = engine.decode(latents).astype(int), tiled.decode(latents).astype(int)
  assert plain.shape == chunked.shape == (1, 9, 16, 16, 3)
  assert np.abs(plain - chunked).max() <= 1


@pytest.mark.parametrize("task", ["i2v", "extend-forward", "extend-backward", "loop", "edit", "connect"])
def test_every_task_repeats_with_its_seed_and_changes_with_another(engine, clip, task):
  inputs = {
      "i2v": dict(image=clip[0]), "extend-forward": dict(video=clip, frames=17),
      "extend-backward": dict(video=clip, frames=17), "loop": {}, "edit": dict(video=clip, strength=0.2),
      "connect": dict(video=clip, video2=clip[::-1].copy()),
  }[task]
  kwargs = dict(dict(frames=9), **inputs)
  run = lambda seed: sample.generate(engine, task, ["a red 3 moves right"], seed=seed, **SIZE, **FAST, **kwargs)
  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first.videos, again.videos)
  generated = ~first.given_latent
  assert np.abs(first.latents[:, generated] - other.latents[:, generated]).mean() > 1e-3
  np.testing.assert_array_equal(first.latents[:, ~generated], other.latents[:, ~generated])


def test_training_samples_with_a_bad_size_log_and_do_not_stop_training(workdir, engine, caplog):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"), ["--config.sample.frames=6"])
  dit_hooks.training_samples(config, str(workdir), engine.mesh, engine.dit_graphdef, {"ema": engine.dit_params}, 7)
  assert "no training samples" in caplog.text and "nearest valid: 5 or 9" in caplog.text
  assert not list((workdir / "dit").glob("samples/step_000007*"))
