"""`vidsim eval`: the world probes' criteria on true and broken clips, and the command on a workdir.

The criteria tests render clips of the moving_digits world (numpy) instead of training
models: true clips must score at the probe's ceiling, and clips broken the way a bad
model breaks them (a digit swapped behind the bar, frozen frames, a loop with a cut, a
reversed extension) must fail.
"""

import json
import os

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from vidsim import cli, digit_score
from vidsim import config as config_lib
from vidsim.data import moving_digits
from vidsim.eval import cases, criteria, probes
from vidsim.models import dit as dit_lib
from vidsim.models import vae as vae_lib
from vidsim.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 12


@pytest.fixture(scope="module")
def world():
  """The permanence experiment's world (13x32x48 clips with the grey bar, 12 px digits)."""
  return config_lib.load_config(os.path.join(ROOT, "experiments", "digits_permanence.py"))


@pytest.fixture(scope="module")
def plain_world():
  """The same world without the bar, at 9x32x32 (the quality experiment's sample size)."""
  return config_lib.load_config(os.path.join(ROOT, "experiments", "digits_quality.py"))


@pytest.mark.parametrize("probe, which", [
    ("permanence", "world"), ("i2v", "plain_world"), ("extend-forward", "plain_world"),
    ("extend-backward", "plain_world"), ("loop", "plain_world"), ("connect", "plain_world"),
    ("edit", "plain_world"), ("long-extension", "plain_world"), ("edit", "world"),
])
def test_true_clips_score_at_the_ceiling_and_above_chance(request, probe, which):
  """Other true clips than the ceiling's score within 0.2 of it; the ceiling is well above
  chance (the criteria tell truth from realistic clips that do not answer the inputs)."""
  config = request.getfixturevalue(which)
  ref = probes.reference(config, probe, 30)
  ceiling = np.mean([r["passed"] for r in ref["ceiling"]])
  chance = np.mean([r["passed"] for r in ref["chance"]])
  others = [cases.make_case(config, probe, 1000 + i) for i in range(15)]
  score = np.mean([probes.score_case(config, probe, c, c.real)["passed"] for c in others])
  assert abs(score - ceiling) <= 0.2, (score, ceiling)
  assert ceiling >= 0.6 and ceiling - chance >= 0.4, (ceiling, chance)


def _swapped(seed, occluder_width=14):
  """An occlusion scene, and the same scene with another digit (another label, same
  colour and motion) from the frame where it is fully hidden on."""
  video, _, meta = moving_digits.render_scene(
      np.random.default_rng(seed), split="validation", frames=13, height=32, width=48, digit_size=SIZE,
      max_digits=1, occluder_width=occluder_width, paths="inside")
  digit = meta["digits"][0]
  hidden = digit["occluded_intervals"][0][0]
  _, labels = moving_digits.digit_scans()
  other = next(int(i) for i in moving_digits.split_instances("validation") if labels[i] not in (digit["label"], 1))
  swapped = video.astype(np.float32)
  for t in range(hidden, 13):
    y, x = digit["positions"][t]
    for instance in (digit["instance"], other):  # Erase the old digit, draw the new one.
      alpha = moving_digits.sprite(instance, SIZE)[..., None]
      patch = swapped[t, y : y + SIZE, x : x + SIZE]
      patch[:] = patch * (1 - alpha) + (alpha * np.asarray(digit["rgb"], np.float32) if instance == other else 0)
  swapped[:, :, meta["occluder"]["x0"] : meta["occluder"]["x1"]] = moving_digits.OCCLUDER_RGB
  return video, np.clip(np.rint(swapped), 0, 255).astype(np.uint8)


def test_a_digit_swapped_behind_the_bar_fails_permanence():
  kept = swapped_kept = 0
  for seed in range(20):
    video, swapped = _swapped(seed)
    kept += criteria.permanence(video, SIZE)["passed"]
    row = criteria.permanence(swapped, SIZE)
    swapped_kept += row["passed"]
  assert kept >= 14 and swapped_kept <= 3, (kept, swapped_kept)


def test_a_digit_that_comes_out_elsewhere_fails_permanence():
  video, _ = _swapped(3)
  row = criteria.permanence(video, SIZE)
  assert row["passed"], row
  moved = video.copy()
  moved[row["came_out"] :] = np.roll(video[row["came_out"] :], SIZE, axis=1)  # A digit lower than its path.
  moved_row = criteria.permanence(moved, SIZE)
  assert not moved_row["position_kept"] and not moved_row["passed"], moved_row


def test_frozen_frames_fail_direction(plain_world):
  truth = [cases.make_case(plain_world, "extend-forward", i) for i in range(20)]
  frozen = [np.repeat(c.real[:1], len(c.real), axis=0) for c in truth]
  prompts = [c.prompt for c in truth]
  assert digit_score.score([c.real for c in truth], prompts, SIZE)["direction"] >= 0.7
  assert digit_score.score(frozen, prompts, SIZE)["direction"] <= 0.3
  frozen_extension = [np.concatenate([c.info["source"], np.repeat(c.info["source"][-1:], len(c.real) - 9, 0)])
                      for c in truth]
  assert np.mean([criteria.extension(c.info["source"], f, SIZE, True)["direction_kept"]
                  for c, f in zip(truth, frozen_extension)]) <= 0.2


def test_a_loop_with_a_hard_cut_fails(plain_world):
  loops = [cases.make_case(plain_world, "loop", i) for i in range(20)]
  assert np.mean([criteria.loop(c.real, SIZE)["passed"] for c in loops]) >= 0.9
  cut = [np.concatenate([c.real, loops[(i + 1) % 20].real[:4]]) for i, c in enumerate(loops)]  # Ends on another scene.
  assert np.mean([criteria.loop(v, SIZE)["passed"] for v in cut]) <= 0.2
  assert not criteria.loop(np.repeat(loops[0].real[:1], 9, axis=0), SIZE)["passed"]  # Frozen: no loop.


def test_a_reversed_clip_fails_extend_forward_direction(plain_world):
  truth = [cases.make_case(plain_world, "extend-forward", i) for i in range(20)]
  kept = [criteria.extension(c.info["source"], c.real, SIZE, True)["direction_kept"] for c in truth]
  backwards = [criteria.extension(c.info["source"], np.concatenate([c.info["source"], c.info["source"][-2::-1]]),
                                  SIZE, True)["direction_kept"] for c in truth]
  assert np.mean(kept) >= 0.75 and np.mean(backwards) <= 0.2, (np.mean(kept), np.mean(backwards))


def test_a_digit_changing_frame_to_frame_is_inconsistent(plain_world):
  video, caption = cases.scene(plain_world, "t2v", 0, 9, 32, 32)
  changes, pairs = criteria.identity_changes(video, SIZE)
  assert pairs >= 6 and changes <= 1
  flicker = video.copy()
  other, _ = cases.scene(plain_world, "t2v", 1, 9, 32, 32)
  flicker[1::2] = other[1::2]
  changes, pairs = criteria.identity_changes(flicker, SIZE)
  assert changes >= pairs // 2


def test_probes_skip_what_does_not_apply(tiny_config):
  with tiny_config.unlocked():
    tiny_config.data.builder = "video_folder"
  skipped = probes.skipped_probes(tiny_config)
  assert set(skipped) == set(probes.PROBES)
  assert "no world truth" in skipped["permanence"]
  result = probes.run_probes(tiny_config, None, 2, 4)  # No model is needed when nothing applies.
  assert all("skipped" in entry for entry in result["probes"].values())


# ------------------------------------------------------------------ the command


def test_eval_on_an_empty_workdir_names_the_command_to_run_first(tmp_path, capsys):
  config = os.path.join(ROOT, "experiments", "digits_tiny.py")
  code = cli.main(["eval", "--config", config, "--workdir", str(tmp_path), "--what", "probes"])
  assert code == 2
  err = capsys.readouterr().err
  assert "VAE checkpoint" in err and f"vidsim train-vae --config {config} --workdir {tmp_path}" in err
  assert cli.main(["eval", "--config", config, "--workdir", str(tmp_path), "--what", "speed"]) == 2
  assert "valid: a comma-separated list of vae, loss, probes" in capsys.readouterr().err


def _save(directory, state):
  checkpointer = Checkpointer(directory, async_save=False)
  checkpointer.save(1, state, iter(grain.MapDataset.range(2).to_iter_dataset()), {}, {}, force=True)
  checkpointer.close()


def _random_params(build, seed):
  """Random weights from the param shapes alone (cheaper than initialising on 8 fake devices)."""
  shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(build), nnx.Param)[1])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.mark.slow
def test_eval_writes_vae_and_probe_json_for_a_workdir(tmp_path, tiny_config, monkeypatch):
  """A workdir with a random VAE and DiT: every probe runs through its task and is
  written with its ceiling, chance, n and protocol; the VAE figures per kind, bucket and frame."""
  monkeypatch.setenv("VIDSIM_DATA_DIR", str(tmp_path / "data"))
  config = tiny_config
  dit = _random_params(lambda: dit_lib.DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0)), 1)
  _save(tmp_path / "w" / "dit" / "checkpoints", {"ema": dit})
  channels = config.vae.latent_channels
  _save(tmp_path / "w" / "vae" / "checkpoints", {
      "ema": _random_params(lambda: vae_lib.VideoVAE(config.vae, rngs=nnx.Rngs(0)), 2),
      "latent_shift": np.zeros((channels,), np.float32), "latent_scale": np.ones((channels,), np.float32)})
  code = cli.main(["eval", "--config", os.path.join(ROOT, "experiments", "digits_tiny.py"), "--workdir",
                   str(tmp_path / "w"), "--what", "vae,probes", "--config.eval.probe_count=2",
                   "--config.eval.ceiling_count=4", "--config.sample.steps=1"])
  assert code == 0
  result = json.loads((tmp_path / "w" / "eval" / "probes.json").read_text())
  entries = result["probes"]
  assert {"t2v_5x16x16", "t2v_5x16x24", "identity", "permanence", "i2v", "extend-forward", "extend-backward",
          "loop", "connect", "edit", "long-extension", "offscreen"} <= set(entries)
  assert "bounces" in entries["offscreen"]["skipped"]
  for name, entry in entries.items():
    if "skipped" in entry:
      continue
    assert entry["n"] >= 2 and 0 <= entry["score"] <= 1 and entry["ceiling"] is not None, name
    assert entry["protocol"]["steps"] == 1 and entry["protocol"]["split"] == "validation", name
  assert len(entries["long-extension"]["curve"]["identity"]["score"]) == 4  # 4x a 5-frame clip: 4 more windows.
  vae = json.loads((tmp_path / "w" / "eval" / "vae.json").read_text())
  split = vae["splits"]["validation"]
  assert split["clips"] == 16 and set(split["per_kind"]) == {"images", "videos"}
  assert len(split["per_bucket"]["5x16x16"]["psnr_db_per_frame"]) == 5 and -1 <= split["ssim"] <= 1
  assert "video_folder.path is not set" in vae["video_folder"]["skipped"]
