"""TFDS builder for a user's folder of videos and images, with JSONL captions.

The folder is searched recursively for videos (mp4, webm, mov, mkv, avi, m4v, gif;
decoded with PyAV) and images (png, jpg, bmp, webp). Captions come from a JSONL
sidecar (`{"file": "relative/path.mp4", "caption": "..."}` per line); files without
one get an empty caption; lines whose path leaves the folder are refused. Videos are
resampled to at most `video_folder.fps`, cut into clips of at most `max_frames`, and
downscaled (aspect kept) to at most `max_area` pixels; frames are stored as JPEG (or
PNG) bytes. A file that cannot be read is skipped and listed, with its reason, in the
build report (printed by `vidsim data prepare`, written next to the dataset). Files go
to train or validation by a hash of their path (`validation_fraction`); a folder of two
or more readable files always gets both splits (assign_splits).

The built config's name is `<folder name>-<hash>` of the folder path, the build
parameters and a fingerprint of the files (names, sizes, mtimes) and the captions:
adding a video or changing a parameter builds a new dataset, never a stale one.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from vidsim.data import video_io
from vidsim.data.records import PixelDatasetBuilder, make_record, parameter_hash
from vidsim.errors import UsageError

REPORT_NAME = "build_report.json"


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  params: dict = dataclasses.field(default_factory=dict)


def media_files(folder: str):
  """(videos and images, other files) under `folder`, as sorted relative paths."""
  media, other = [], []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(root, name), folder)
      extension = os.path.splitext(name)[1].lower()
      (media if extension in video_io.VIDEO_EXTENSIONS + video_io.IMAGE_EXTENSIONS else other).append(rel)
  return media, other


def folder_params(config) -> dict:
  """Everything that changes the built data, including a fingerprint of the files."""
  vf = config.video_folder
  if not vf.path:
    raise UsageError("data.builder='video_folder' needs --config.video_folder.path=FOLDER")
  folder = os.path.abspath(os.path.expanduser(vf.path))
  if not os.path.isdir(folder):
    raise UsageError(f"video_folder.path={vf.path!r} is not a folder")
  if vf.frame_format not in ("jpeg", "png"):
    raise UsageError(f"video_folder.frame_format={vf.frame_format!r}; valid: jpeg, png")
  if vf.max_frames < 1 or vf.fps <= 0:
    raise UsageError(f"video_folder.max_frames ({vf.max_frames}) and fps ({vf.fps}) must be positive")
  fingerprint = hashlib.sha1()
  media, _ = media_files(folder)
  captions = os.path.join(folder, vf.captions)
  for rel in media + ([vf.captions] if os.path.isfile(captions) else []):
    stat = os.stat(os.path.join(folder, rel))
    fingerprint.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return dict(
      path=folder, captions=vf.captions, max_frames=int(vf.max_frames), fps=float(vf.fps),
      max_area=int(vf.max_area), validation_fraction=float(vf.validation_fraction),
      frame_format=vf.frame_format, jpeg_quality=int(vf.jpeg_quality),
      min_clip_frames=int(vf.min_clip_frames) or max(1, int(vf.max_frames) // 2),
      files=fingerprint.hexdigest(),
  )


def make_builder(config, preset: str, data_dir: str) -> "VideoFolder":
  """The builder of config.video_folder's folder. `preset` is unused: the folder and the
  build parameters name the dataset."""
  del preset
  params = folder_params(config)
  name = "".join(c if c.isalnum() else "_" for c in os.path.basename(params["path"]))[:40] or "folder"
  tfds_config = VideoFolderConfig(name=f"{name}-{parameter_hash(params)}",
                                  description=f"video_folder {params['path']}", params=params)
  return VideoFolder(config=tfds_config, data_dir=data_dir, file_format="array_record")


def load_captions(folder: str, captions_name: str):
  """{relative path: caption} and a list of refused lines, from the JSONL sidecar."""
  path = os.path.join(folder, captions_name)
  captions, problems = {}, []
  if not os.path.isfile(path):
    return captions, problems
  root = os.path.realpath(folder)
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        file, caption = entry["file"], entry.get("caption", "")
        if not isinstance(file, str) or not isinstance(caption, str):
          raise TypeError("'file' and 'caption' must be strings")
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(dict(line=number, reason=f"not a {{\"file\", \"caption\"}} JSON object: {e}"))
        continue
      resolved = os.path.realpath(os.path.join(root, file))
      if os.path.isabs(file) or os.path.commonpath([root, resolved]) != root:
        problems.append(dict(line=number, file=file, reason="caption path points outside the folder"))
        continue
      captions[os.path.relpath(resolved, root)] = caption
  return captions, problems


def split_draw(rel: str) -> float:
  """A file's place in [0, 1] from a hash of its path: stable as the folder grows."""
  return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(rel: str, validation_fraction: float) -> str:
  """A file's split by its hash alone (see assign_splits for small folders)."""
  return "validation" if split_draw(rel) < validation_fraction else "train"


def assign_splits(files, validation_fraction: float) -> dict:
  """{"train": files, "validation": files}: each file by its hash (split_of), except that
  two or more files always give both splits, since training needs a train split and its
  evaluation a validation one (by hash alone, three files at 0.3 can all land in
  validation). Then the validation split is the round(fraction * n) files, at least 1 and
  at most n - 1, of the lowest split_draw: the files the hash rule holds out first.
  Folders whose hash split already has both keep it. One file is train only."""
  count = len(files)
  if count < 2:
    return {"train": list(files), "validation": []}
  splits = {"train": [], "validation": []}
  for rel in files:
    splits[split_of(rel, validation_fraction)].append(rel)
  if splits["train"] and splits["validation"]:
    return splits
  held_out = min(max(round(validation_fraction * count), 1), count - 1)
  validation = set(sorted(files, key=lambda rel: (split_draw(rel), rel))[:held_out])
  return {"train": [f for f in files if f not in validation], "validation": [f for f in files if f in validation]}


def stable_id(key: str) -> int:
  return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)  # < 2**60: fits int64.


def file_clips(path: str, params: dict):
  """[(uint8 [T, H, W, 3], fps, start_frame)] of one file; raises on an unreadable file."""
  if os.path.getsize(path) == 0:
    raise ValueError("empty file")
  extension = os.path.splitext(path)[1].lower()
  if extension in video_io.IMAGE_EXTENSIONS:
    image = video_io.downscale_to_area(video_io.read_image(path), params["max_area"])
    return [(image[None], params["fps"], 0)]
  source_fps = video_io.video_fps(path)
  fps = min(params["fps"], source_fps) if source_fps > 0 else params["fps"]
  clips, current, start, count = [], [], 0, 0
  for frame, _ in video_io.iter_video_frames(path, fps=params["fps"], max_area=params["max_area"]):
    if current and frame.shape != current[0].shape:
      raise ValueError(f"frame size changes mid-stream at frame {count}")
    current.append(frame)
    count += 1
    if len(current) == params["max_frames"]:
      clips.append((np.stack(current), fps, start))
      current, start = [], count
  if current and (not clips or len(current) >= params["min_clip_frames"]):
    clips.append((np.stack(current), fps, start))
  if not clips:
    raise ValueError("no decodable frames")
  return clips


def check_file(path: str, params: dict) -> None:
  """Decodes a whole file without keeping it; raises what file_clips would raise."""
  if os.path.getsize(path) == 0:
    raise ValueError("empty file")
  if os.path.splitext(path)[1].lower() in video_io.IMAGE_EXTENSIONS:
    video_io.read_image(path)
    return
  shape, count = None, 0
  for frame, _ in video_io.iter_video_frames(path, fps=params["fps"]):
    if shape is not None and frame.shape != shape:
      raise ValueError(f"frame size changes mid-stream at frame {count}")
    shape, count = frame.shape, count + 1
  if not count:
    raise ValueError("no decodable frames")


def _reason(error: Exception) -> str:
  text = str(error).strip() or type(error).__name__
  return text if isinstance(error, ValueError) and type(error) is ValueError else f"{type(error).__name__}: {text}"


class VideoFolder(PixelDatasetBuilder):
  """A user's videos and images, as clips with captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._report = None

  def build_description(self) -> str:
    params = self.builder_config.params
    return (f"clips of at most {params['max_frames']} frames at {params['fps']:g} fps and {params['max_area']} "
            f"pixels from the videos and images in {params['path']} (validation_fraction "
            f"{params['validation_fraction']:g})")

  @property
  def report_path(self) -> str:
    return os.path.join(os.path.dirname(self.data_dir), REPORT_NAME)

  def _split_generators(self, dl_manager):
    del dl_manager
    params = self.builder_config.params
    media, other = media_files(params["path"])
    captions, problems = load_captions(params["path"], params["captions"])
    skipped = []
    readable = []
    for rel in media:
      # Checked before the splits are fixed: TFDS cannot write a split that ends up empty.
      try:
        check_file(os.path.join(params["path"], rel), params)
        readable.append(rel)
      except Exception as e:  # pylint: disable=broad-except
        # A bad file must never stop the build: it is listed with its reason instead.
        skipped.append(dict(file=rel, reason=_reason(e)))
    if not readable:
      raise UsageError(f"video_folder {params['path']}: no readable video or image among {len(media)} files; "
                       f"skipped: {skipped}")
    splits = assign_splits(readable, params["validation_fraction"])
    self._report = dict(folder=params["path"], media_files=len(media), other_files=len(other),
                        caption_problems=problems, skipped=skipped, clips={"train": 0, "validation": 0},
                        videos=0, images=0)
    # TFDS cannot write an empty split: a folder of one file has only train.
    return {split: self._generate_examples(split, files, captions) for split, files in splits.items() if files}

  def _generate_examples(self, split, files, captions):
    params, report = self.builder_config.params, self._report
    for rel in files:
      try:
        clips = file_clips(os.path.join(params["path"], rel), params)
        records = []
        for index, (clip, fps, start) in enumerate(clips):
          key = f"{rel}#{index}"
          metadata = dict(file=rel, clip=index, start_frame=start, split=split)
          records.append((key, make_record(clip, captions.get(rel, ""), fps, stable_id(key),
                                           f"{rel}[{start}:{start + len(clip)}]", metadata,
                                           params["frame_format"], params["jpeg_quality"])))
      except Exception as e:  # pylint: disable=broad-except
        # A bad file must never stop the build: it is listed with its reason instead.
        report["skipped"].append(dict(file=rel, reason=_reason(e)))
        continue
      is_image = os.path.splitext(rel)[1].lower() in video_io.IMAGE_EXTENSIONS
      report["images" if is_image else "videos"] += 1
      report["clips"][split] += len(records)
      yield from records

  def download_and_prepare(self, *args, **kwargs):
    super().download_and_prepare(*args, **kwargs)
    if self._report is not None:  # Built now (not reused): keep the report next to the data.
      with open(self.report_path, "w") as f:
        json.dump(self._report, f, indent=2)

  def build_report_text(self) -> str:
    return f"{format_report(self.build_report())}\nreport: {self.report_path}"

  def build_report(self) -> dict:
    """The report of the build that made this dataset (empty if there is none)."""
    if self._report is not None:
      return self._report
    if os.path.exists(self.report_path):
      with open(self.report_path) as f:
        return json.load(f)
    return {}


def format_report(report: dict) -> str:
  """The build report as text lines for the terminal."""
  if not report:
    return "no build report"
  lines = [
      f"folder {report['folder']}: {report['media_files']} video/image files "
      f"({report['other_files']} other files ignored)",
      f"  read: {report['videos']} videos, {report['images']} images -> clips: "
      f"train {report['clips']['train']}, validation {report['clips']['validation']}",
      f"  skipped: {len(report['skipped'])} files",
  ]
  lines += [f"    {s['file']}: {s['reason']}" for s in report["skipped"]]
  if report["caption_problems"]:
    lines.append(f"  caption lines refused: {len(report['caption_problems'])}")
    lines += [f"    line {p['line']}{' ' + p['file'] if 'file' in p else ''}: {p['reason']}"
              for p in report["caption_problems"]]
  return "\n".join(lines)
