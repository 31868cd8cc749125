"""The moving_digits renderer: deterministic, captions and metadata that match the pixels."""

import numpy as np
import pytest

from vidsim.data import moving_digits
from vidsim.errors import UsageError


def _scene(seed, **kwargs):
  args = dict(split="train", frames=9, height=32, width=32)
  args.update(kwargs)
  return moving_digits.render_scene(np.random.default_rng(seed), **args)


def _colour_pixels(frame, rgb, tolerance=40):
  """Pixels of `frame` whose colour is close to `rgb` (a digit's solid strokes)."""
  return np.all(np.abs(frame.astype(int) - np.asarray(rgb)) < tolerance, axis=-1)


def test_same_seed_same_scene_and_different_seed_differs():
  a, caption_a, meta_a = _scene(3)
  b, caption_b, meta_b = _scene(3)
  c, _, _ = _scene(4)
  np.testing.assert_array_equal(a, b)
  assert caption_a == caption_b and meta_a == meta_b
  assert not np.array_equal(a, c)


def test_digit_is_where_metadata_says():
  for seed in range(10):
    video, _, meta = _scene(seed, max_digits=1)
    (digit,) = meta["digits"]
    size = meta["digit_size"]
    for t, (y, x) in enumerate(digit["positions"]):
      hits = _colour_pixels(video[t], digit["rgb"])
      assert hits.sum() > 0
      ys, xs = np.nonzero(hits)
      # Every pixel of the digit's colour is inside its box.
      assert ys.min() >= y and ys.max() < y + size and xs.min() >= x and xs.max() < x + size


def test_digit_invisible_while_occluded_and_comes_out():
  hidden_frames = 0
  for seed in range(8):
    video, caption, meta = _scene(seed, frames=13, height=32, width=48, occluder_width=14)
    occ = meta["occluder"]
    assert np.all(video[:, :, occ["x0"] : occ["x1"]] == moving_digits.OCCLUDER_RGB)
    for digit in meta["digits"]:
      assert digit["occluded_intervals"], "occlusion scenes aim every digit behind the bar"
      assert "passes behind the grey bar" in caption
      assert digit["visible_fraction"][0] > 0.5 or digit["visible_fraction"][-1] > 0.5  # Enters or leaves visible.
      for start, end in digit["occluded_intervals"]:
        for t in range(start, end):
          hidden_frames += 1
          others = [d for d in meta["digits"] if d is not digit and d["color"] == digit["color"]]
          if not others:
            assert _colour_pixels(video[t], digit["rgb"]).sum() == 0
  assert hidden_frames > 0


def test_caption_names_labels_colours_and_motion():
  video, caption, meta = _scene(1, max_digits=2)
  for digit in meta["digits"]:
    assert f"{digit['color']} {digit['label']}" in caption
  assert any(word in caption for word in ("moves", "falls", "rises"))


def test_inside_paths_keep_the_caption_true_for_the_whole_clip():
  flips = 0
  for seed in range(40):
    _, bounce_caption, bounce = _scene(seed, max_digits=1)
    _, caption, meta = _scene(seed, max_digits=1, paths="inside")
    (digit,), (bounced,) = meta["digits"], bounce["digits"]
    # The same random draws: same digit, colour and velocity, so the same caption; only the start moves.
    assert caption == bounce_caption and digit["velocity"] == bounced["velocity"]
    assert digit["instance"] == bounced["instance"]
    steps = np.diff(np.asarray(digit["positions"]), axis=0)
    velocity = np.asarray(digit["velocity"])
    # 9 frames at <= 2.5 px/frame fit in 32 - 12 pixels: no axis ever reverses.
    assert np.all(steps * np.sign(velocity) >= 0), (seed, digit["positions"])
    flips += bool(np.any(np.diff(np.asarray(bounced["positions"]), axis=0) * np.sign(velocity) < 0))
  assert flips > 5  # ... where paths that start anywhere often bounce.


def test_inside_paths_longer_than_the_frame_start_at_the_edge_behind():
  for seed in range(10):
    _, _, meta = _scene(seed, frames=33, max_digits=1, paths="inside", speed=(2.0, 2.5))
    (digit,) = meta["digits"]
    vy, vx = digit["velocity"]
    y, x = digit["positions"][0]
    # The longer axis of travel cannot fit: it starts at the edge it moves away from.
    if abs(vx) * 32 > 20:
      assert x == (0 if vx > 0 else 20)
    if abs(vy) * 32 > 20:
      assert y == (0 if vy > 0 else 20)


def test_counterfactual_captions_get_one_attribute_wrong():
  assert moving_digits.flip_directions("a red 3 moves up and to the left while a blue 7 falls") == (
      "a red 3 moves down and to the right while a blue 7 rises")
  assert moving_digits.flip_directions("a green 0 slowly rises") == "a green 0 slowly falls"
  assert moving_digits.change_digits("a red 3 moves left while a blue 7 falls") == "a red 8 moves left while a blue 2 falls"
  assert set(moving_digits.COUNTERFACTUALS) == {"direction", "digit"}


def test_images_and_any_aspect_ratio():
  image, caption, meta = _scene(0, frames=1, height=40, width=24)
  assert image.shape == (1, 40, 24, 3) and meta["digits"][0]["visible_fraction"] == [1.0]
  assert "moves" not in caption and any(w in caption for w in ("top", "bottom", "left", "right", "centre"))
  wide, _, _ = _scene(0, frames=5, height=16, width=40, digit_size=10)
  assert wide.shape == (5, 16, 40, 3)


def test_splits_use_disjoint_digit_instances():
  sets = [set(moving_digits.split_instances(s).tolist()) for s in moving_digits.SPLITS]
  assert all(sets) and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
  _, _, meta = _scene(5, split="test", max_digits=3)
  assert all(d["instance"] in sets[2] for d in meta["digits"])


def test_bad_sizes_are_usage_errors():
  with pytest.raises(UsageError, match="digit_size"):
    _scene(0, height=8, width=32, digit_size=12)
  with pytest.raises(UsageError, match="colors"):
    _scene(0, colors=("purple",))
  with pytest.raises(UsageError, match="paths='straight'; valid: bounce, inside"):
    _scene(0, paths="straight")


def test_caption_styles_change_only_the_caption():
  from vidsim import config as config_lib
  from vidsim.data import moving_digits_tfds

  seen = {}
  for style in moving_digits.CAPTION_STYLES:
    for seed in range(8):
      video, caption, meta = _scene(seed, frames=13, width=48, occluder_width=14 * (seed % 2), captions=style)
      base, default_caption, base_meta = _scene(seed, frames=13, width=48, occluder_width=14 * (seed % 2))
      np.testing.assert_array_equal(video, base)
      assert meta == base_meta
      seen.setdefault(style, []).append((caption, meta))
  assert [c for c, _ in seen["default"]] == [_scene(s, frames=13, width=48, occluder_width=14 * (s % 2))[1]
                                             for s in range(8)]
  for caption, meta in seen["descriptive"]:
    for digit in meta["digits"]:
      assert f"{digit['color']} handwritten {digit['label']}" in caption or (
          f"digit {digit['label']}, drawn in {digit['color']}" in caption)
      assert any(w in caption for w in ("slowly", "steady", "quickly"))
      assert any(w in caption for w in ("starts", "starting", "begins"))
    assert ("grey bar" in caption) == any(d["occluded_intervals"] for d in meta["digits"])
  assert len({c for c, _ in seen["short"]} - {c for c, _ in seen["default"]}) > 0  # Paraphrased.
  mixed = [c for c, _ in seen["mixed"]]
  assert any("black" in c for c in mixed) and not all("black" in c for c in mixed)
  # The default style is not a dataset parameter: datasets built before the key keep their names.
  config = config_lib.base_config()
  assert "captions" not in moving_digits_tfds.world_params(config)
  with config.unlocked():
    config.moving_digits.captions = "mixed"
  assert moving_digits_tfds.world_params(config)["captions"] == "mixed"
  with pytest.raises(UsageError, match="captions='long'; valid: default, short, descriptive, mixed"):
    _scene(0, captions="long")
