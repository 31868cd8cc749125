"""Reading and writing videos (PyAV) and images (PIL), per-frame byte encoding, and the
generated-output writers (one file per sample plus a contact sheet).

Frames are always uint8 RGB arrays [H, W, 3]; videos are [T, H, W, 3].
"""

import io
import math
import os

import av
import numpy as np
from PIL import Image

from vidsim.atomic import write_atomically
from vidsim.errors import UsageError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
OUTPUT_VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm")  # What generated videos may be written as.
GIVEN_COLOR = (255, 140, 0)  # Contact-sheet border of frames given as conditions.
GENERATED_COLOR = (48, 48, 48)  # Border of generated frames.
SHEET_MAX_COLUMNS = 24  # Longer videos are shown at evenly spaced frames.
SHEET_BORDER = 3  # Pixels of the coloured frame border (thick enough to see at a glance).
_WRITE_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".gif": ("pil", "")}


# ------------------------------------------------------------------ frames <-> bytes


def encode_image(frame: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
  """uint8 [H, W, 3] -> PNG or JPEG bytes."""
  buffer = io.BytesIO()
  image = Image.fromarray(np.ascontiguousarray(frame, np.uint8))
  if image_format == "png":
    image.save(buffer, format="PNG", compress_level=1)  # Fast; frames are small.
  elif image_format == "jpeg":
    image.save(buffer, format="JPEG", quality=int(quality))
  else:
    raise UsageError(f"frame format {image_format!r}: valid are png, jpeg")
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def read_image(path) -> np.ndarray:
  """An image file -> uint8 [H, W, 3] (raises on unreadable files)."""
  with Image.open(path) as image:
    image.load()
    return np.asarray(image.convert("RGB"))


def write_png(path, image: np.ndarray) -> None:
  """uint8 [H, W, 3] (or [H, W]) -> PNG file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")


def downscale_to_area(frame: np.ndarray, max_area: int) -> np.ndarray:
  """Shrinks a frame keeping its aspect ratio so H*W <= max_area (never upscales)."""
  height, width = frame.shape[:2]
  if max_area <= 0 or height * width <= max_area:
    return frame
  scale = math.sqrt(max_area / (height * width))
  size = (max(1, int(width * scale)), max(1, int(height * scale)))
  return np.asarray(Image.fromarray(frame).resize(size, Image.BOX))  # BOX: area average, no aliasing.


# ------------------------------------------------------------------ videos


def iter_video_frames(path, fps: float = 0.0, max_area: int = 0):
  """Yields (frame uint8 [H, W, 3], time_s) of the first video stream.

  fps > 0 keeps one frame per 1/fps seconds (never more frames than the source has);
  max_area > 0 downscales frames larger than that. Raises av.error.FFmpegError (or
  ValueError) on unreadable files.
  """
  with av.open(str(path)) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    next_time = 0.0
    for index, frame in enumerate(container.decode(stream)):
      time = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
      if fps > 0:
        if time + 1e-6 < next_time:
          continue
        next_time = max(next_time + 1.0 / fps, time + 0.5 / fps)
      yield downscale_to_area(frame.to_ndarray(format="rgb24"), max_area), time


def video_fps(path) -> float:
  """Average frame rate of the first video stream (0 if unknown)."""
  with av.open(str(path)) as container:
    rate = container.streams.video[0].average_rate
    return float(rate) if rate else 0.0


def read_video(path, max_frames: int = 0, fps: float = 0.0, max_area: int = 0):
  """A video file -> (frames uint8 [T, H, W, 3], fps). max_frames > 0 stops early."""
  source_fps = video_fps(path)
  frames = []
  for frame, _ in iter_video_frames(path, fps=fps, max_area=max_area):
    frames.append(frame)
    if max_frames and len(frames) >= max_frames:
      break
  if not frames:
    raise ValueError(f"{path}: no frames")
  out_fps = min(fps, source_fps) if fps > 0 and source_fps > 0 else (fps or source_fps)
  return np.stack(frames), float(out_fps)


def write_video(path, frames: np.ndarray, fps: float) -> None:
  """uint8 [T, H, W, 3] -> .mp4 (H.264, PyAV), .webm (VP9, PyAV) or .gif (PIL), by extension."""
  extension = os.path.splitext(str(path))[1].lower()
  if extension not in _WRITE_CODECS:
    raise UsageError(f"cannot write video {path}: extension must be one of {sorted(_WRITE_CODECS)}")
  frames = np.asarray(frames, np.uint8)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise UsageError(f"write_video expects uint8 [T, H, W, 3], got shape {frames.shape}")
  codec, pix_fmt = _WRITE_CODECS[extension]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if codec == "pil":
    # PyAV's gif encoder gets only a fixed 3-3-2 palette from rgb24; PIL picks one per frame.
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return
  if pix_fmt == "yuv420p":
    # 4:2:0 chroma needs even sizes: pad by repeating the last row/column.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  rate = max(1, int(round(fps)))
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = pix_fmt
    if codec == "libx264":
      stream.options = {"crf": "18"}
    for frame in frames:
      video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
      for packet in stream.encode(video_frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# ------------------------------------------------------------------ generated outputs


def contact_sheet(videos, given, min_side: int = 64) -> np.ndarray:
  """uint8 [rows*H', cols*W', 3]: one row per sample, frames left to right, each framed
  by a SHEET_BORDER-pixel border, orange where the frame was given as a condition."""
  videos = np.asarray(videos, np.uint8)
  n, t, h, w, _ = videos.shape
  columns = np.unique(np.linspace(0, t - 1, min(t, SHEET_MAX_COLUMNS)).round().astype(int))
  zoom = max(1, -(-min_side // min(h, w)))  # Nearest-neighbour upscale so small frames stay visible.
  border = SHEET_BORDER
  cell_h, cell_w = h * zoom + 2 * border, w * zoom + 2 * border
  sheet = np.full((n * cell_h, len(columns) * cell_w, 3), 255, np.uint8)
  for i in range(n):
    for j, f in enumerate(columns):
      y, x = i * cell_h, j * cell_w
      sheet[y : y + cell_h, x : x + cell_w] = GIVEN_COLOR if given[f] else GENERATED_COLOR
      frame = videos[i, f].repeat(zoom, axis=0).repeat(zoom, axis=1)
      sheet[y + border : y + border + h * zoom, x + border : x + border + w * zoom] = frame
  return sheet


def sheet_path(out) -> str:
  """O.mp4 -> O.sheet.png."""
  return os.path.splitext(str(out))[0] + ".sheet.png"


def output_paths(out, num_samples: int) -> list:
  """One file per sample: O.ext for one sample, O_0.ext, O_1.ext, ... for several."""
  if num_samples == 1:
    return [str(out)]
  stem, extension = os.path.splitext(str(out))
  return [f"{stem}_{i}{extension}" for i in range(num_samples)]


def write_outputs(out, videos, given, fps: float) -> list:
  """Writes every sample of videos uint8 [N, T, H, W, 3] (a video by its extension, or a
  PNG for one frame) and their contact sheet (`given`: bool [T], frames given as
  conditions). Each file is written atomically. Returns the paths (samples, then sheet)."""
  written = []
  for path, video in zip(output_paths(out, len(videos)), videos):
    if path.lower().endswith(".png"):
      write_atomically(path, lambda tmp, v=video: write_png(tmp, v[0]))
    else:
      write_atomically(path, lambda tmp, v=video: write_video(tmp, v, fps))
    written.append(path)
  sheet = sheet_path(out)
  write_atomically(sheet, lambda tmp: write_png(tmp, contact_sheet(videos, given)))
  written.append(sheet)
  return written
