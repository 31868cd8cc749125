"""Which latent frames each task gives clean, and how windows are stitched (no model needed)."""

import numpy as np
import pytest

from vidsim import tasks
from vidsim.errors import UsageError

HWC = (2, 3, 4)


def _latents(n, t, offset=0.0):
  """Distinct values per (sample, frame) so copies are traceable."""
  base = np.arange(n * t, dtype=np.float32).reshape(n, t, 1, 1, 1) + offset
  return np.broadcast_to(base, (n, t) + HWC).copy()


class FakeModel:
  """Stands in for the DiT: keeps clean frames, fills the rest with -(call index + 1)."""

  def __init__(self):
    self.calls = []

  def __call__(self, windows):
    self.calls.append(windows)
    out = np.stack([w.values for w in windows])
    fill = -float(len(self.calls))
    clean = np.stack([w.clean for w in windows])
    return np.where(clean[:, :, None, None, None], out, fill).astype(np.float32)


def test_bridge_window_places_both_ends():
  before, after = _latents(1, 2)[0], _latents(1, 1, offset=100)[0]
  w = tasks.bridge_window(before, after, 5)
  assert w.clean.tolist() == [True, True, False, False, True]
  np.testing.assert_array_equal(w.values[:2], before)
  np.testing.assert_array_equal(w.values[4], after[0])
  assert np.all(w.values[2:4] == 0) and w.start_t == 1.0


def test_prefix_and_suffix_windows():
  ctx = _latents(1, 1, offset=7)[0]
  assert tasks.prefix_window(ctx, 3).clean.tolist() == [True, False, False]
  assert tasks.suffix_window(ctx, 3).clean.tolist() == [False, False, True]


def test_window_that_generates_nothing_is_a_usage_error():
  with pytest.raises(UsageError, match="cannot hold"):
    tasks.bridge_window(_latents(1, 2)[0], _latents(1, 1)[0], 3)


@pytest.mark.parametrize("forward", [True, False])
def test_extend_keeps_source_and_slides_windows(forward):
  source = _latents(2, 3, offset=10)
  model = FakeModel()
  out = tasks.extend(model, source, total=8, window=3, overlap=1, forward=forward)
  assert out.latents.shape == (2, 8) + HWC
  if forward:
    np.testing.assert_array_equal(out.latents[:, :3], source)
    assert out.given.tolist() == [True] * 3 + [False] * 5
  else:
    np.testing.assert_array_equal(out.latents[:, 5:], source)
    assert out.given.tolist() == [False] * 5 + [True] * 3
  # Windows of 3 latent frames with 1 clean: 2 new frames each -> 3 windows for 5 frames.
  assert len(model.calls) == 3
  for windows in model.calls:
    assert windows[0].clean.tolist() == ([True, False, False] if forward else [False, False, True])
  # The second window's clean frame is the last (first) frame the first window made.
  second = model.calls[1][0]
  expected = -1.0
  assert float((second.values[0] if forward else second.values[-1]).mean()) == expected
  assert not np.any(out.latents == 0)


def test_extend_needs_a_longer_target():
  with pytest.raises(UsageError, match="more latent frames"):
    tasks.extend(FakeModel(), _latents(1, 3), total=3, window=3, overlap=1, forward=True)


def test_connect_holds_end_of_first_and_start_of_second():
  first, second = _latents(2, 3, offset=10), _latents(2, 3, offset=50)
  out = tasks.connect(FakeModel(), first, second, window=4, overlap=1)
  assert out.latents.shape == (2, 4) + HWC
  np.testing.assert_array_equal(out.latents[:, 0], first[:, -1])
  np.testing.assert_array_equal(out.latents[:, -1], second[:, 0])
  assert out.given.tolist() == [True, False, False, True]


def test_loop_bridges_clip_end_back_to_its_frame_1():
  model = FakeModel()
  out = tasks.loop(model, num_samples=2, clip_frames=3, grid_hwc=HWC, window=4, overlap=1)
  assert out.latents.shape == (2, 3 + 2) + HWC  # The clip + the bridge's 2 new frames.
  clip = out.latents[:, :3]
  bridge = model.calls[1][0]
  assert bridge.clean.tolist() == [True, False, False, True]
  np.testing.assert_array_equal(bridge.values[0], clip[0, -1])
  # The bridge arrives at latent frame 1 (not frame 0, one pixel frame that a window's
  # end would stretch to ct); the decoded frame 0 is left out, the bridge's end in its place.
  np.testing.assert_array_equal(bridge.values[-1], clip[0, 1])
  assert out.drop_first_frames == 1
  assert not out.given.any()


def test_loop_comes_back_in_as_many_frames_as_the_clip_moved():
  # Whatever the sliding window: clip_frames - 1 new latent frames between the overlaps.
  for clip_frames, window, overlap in ((4, 4, 1), (4, 9, 0), (6, 7, 2)):
    model = FakeModel()
    out = tasks.loop(model, num_samples=1, clip_frames=clip_frames, grid_hwc=HWC, window=window, overlap=overlap)
    given = tasks.resolve_overlap(window, overlap, ends=2)
    bridge = model.calls[1][0]
    assert bridge.clean.tolist() == [True] * given + [False] * (clip_frames - 1) + [True] * given
    assert out.latents.shape[1] == 2 * clip_frames - 1


def test_loop_clip_must_hold_frame_0_and_the_overlap():
  with pytest.raises(UsageError, match="too short"):
    tasks.loop(FakeModel(), num_samples=1, clip_frames=1, grid_hwc=HWC, window=4, overlap=1)


def test_edit_window_and_strength_range():
  w = tasks.edit_window(_latents(1, 2)[0], 0.5)
  assert w.start_t == 0.5 and not w.clean.any()
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(UsageError, match="strength"):
      tasks.check_strength(bad)


def test_clean_tokens_expand_per_patch_and_reject_split_patches():
  mask = tasks.clean_tokens([True, False, False], (3, 2, 2), pt=1)
  assert mask.tolist() == [True] * 4 + [False] * 8
  assert tasks.clean_tokens([True, True, False, False], (2, 1, 1), pt=2).tolist() == [True, False]
  with pytest.raises(UsageError, match="multiple of the temporal patch"):
    tasks.clean_tokens([True, False, False, False], (2, 1, 1), pt=2)


def test_overlap_auto_and_errors():
  assert tasks.resolve_overlap(9, 0, ends=1) == 3
  assert tasks.resolve_overlap(3, 0, ends=2) == 1
  with pytest.raises(UsageError, match="overlap"):
    tasks.resolve_overlap(2, 1, ends=2)


def test_pixel_given_maps_latent_frames_to_pixel_frames():
  assert tasks.pixel_given([True, False, True], 2).tolist() == [True, False, False, True, True]
