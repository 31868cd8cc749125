"""Video and image I/O: PyAV/PIL round trips, frame-rate resampling, downscaling."""

import numpy as np
import pytest

from vidsim.data import video_io
from vidsim.errors import UsageError


def _clip(frames=8, height=20, width=30):
  video = np.zeros((frames, height, width, 3), np.uint8)
  video[:, 4:14, 5:12] = (230, 40, 40)
  video[:, :, 20:] = (50, 90, 240)
  for t in range(frames):
    video[t, :, t] = 255  # A bar that moves: frames differ.
  return video


@pytest.mark.parametrize("extension, tolerance", [(".mp4", 8), (".webm", 8), (".gif", 1)])
def test_write_then_read_video(tmp_path, extension, tolerance):
  video = _clip()
  path = tmp_path / f"clip{extension}"
  video_io.write_video(path, video, fps=8)
  frames, fps = video_io.read_video(path)
  assert frames.shape[0] == 8 and abs(fps - 8) < 0.5
  # Odd sizes are padded for 4:2:0 codecs; the original area reads back close.
  assert np.abs(frames[:, :20, :30].astype(int) - video).mean() < tolerance


def test_frame_rate_resampling_and_max_area(tmp_path):
  path = tmp_path / "fast.mp4"
  video_io.write_video(path, _clip(frames=24, height=40, width=64), fps=24)
  frames, fps = video_io.read_video(path, fps=8, max_area=16 * 26)
  assert fps == 8 and len(frames) == 8
  assert frames.shape[1] * frames.shape[2] <= 16 * 26
  assert abs(frames.shape[2] / frames.shape[1] - 64 / 40) < 0.15
  assert len(video_io.read_video(path, max_frames=5)[0]) == 5
  slow, slow_fps = video_io.read_video(path, fps=50)  # Never invents frames.
  assert len(slow) == 24 and slow_fps == 24


def test_images_and_encoded_frames(tmp_path):
  image = _clip()[0]
  video_io.write_png(tmp_path / "a.png", image)
  np.testing.assert_array_equal(video_io.read_image(tmp_path / "a.png"), image)
  np.testing.assert_array_equal(video_io.decode_image(video_io.encode_image(image, "png")), image)
  assert np.abs(video_io.decode_image(video_io.encode_image(image, "jpeg", 95)).astype(int) - image).mean() < 6


def test_bad_writes_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match="extension"):
    video_io.write_video(tmp_path / "a.avi", _clip(), 8)
  with pytest.raises(UsageError, match="shape"):
    video_io.write_video(tmp_path / "a.mp4", _clip()[..., 0], 8)
