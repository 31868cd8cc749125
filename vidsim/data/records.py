"""The record schema every vidsim pixel dataset shares, and the TFDS builder base class.

One record per clip: the frames as encoded image bytes (one per frame), their count and
size, fps, caption, a stable example_id, where the clip came from, and JSON metadata.
Builders (moving_digits_tfds, video_folder) make records with `make_record` and derive
from `PixelDatasetBuilder`; the pipeline decodes them (pipeline.decode_example) without
knowing which builder wrote them.

Changing anything here changes the bytes of every dataset built afterwards while its
name (`<preset or folder>-<parameter_hash>`) stays the same, so datasets built before
would no longer match a rebuild: bump the builders' VERSION if the schema must change.
"""

import hashlib
import json
import time

import numpy as np
import tensorflow_datasets as tfds

from vidsim.data.video_io import encode_image
from vidsim.log import get_logger

log = get_logger("data")


def example_features() -> tfds.features.FeaturesDict:
  """The record schema of every vidsim pixel dataset."""
  return tfds.features.FeaturesDict({
      # Encoded PNG/JPEG bytes per frame: compact, and no TF-backed Video feature needed.
      "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
      "height": tfds.features.Tensor(shape=(), dtype=np.int32),
      "width": tfds.features.Tensor(shape=(), dtype=np.int32),
      "fps": tfds.features.Tensor(shape=(), dtype=np.float32),
      "caption": tfds.features.Text(),
      "example_id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "source": tfds.features.Text(),  # Where the clip came from (file and frame range, or the world).
      "metadata": tfds.features.Text(),  # JSON: evaluation metadata (labels, positions, ...).
  })


def make_record(video: np.ndarray, caption: str, fps: float, example_id: int, source: str, metadata: dict,
                image_format="png", quality=90) -> dict:
  """A record of `example_features()` from a uint8 [T, H, W, 3] clip."""
  frames, height, width, _ = video.shape
  return {
      "frames": [encode_image(f, image_format, quality) for f in video],
      "num_frames": np.int32(frames),
      "height": np.int32(height),
      "width": np.int32(width),
      "fps": np.float32(fps),
      "caption": caption,
      "example_id": np.int64(example_id),
      "source": source,
      "metadata": json.dumps(metadata, separators=(",", ":")),
  }


def parameter_hash(params: dict) -> str:
  """10 hex digits of the JSON of everything that changes the data: the suffix of a built config's name."""
  return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


class PixelDatasetBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder of `example_features()` records, made from a vidsim config.

  Subclasses set VERSION, define `_split_generators` / `_generate_examples` and
  `build_description()`. Abstract (TFDS registers only the concrete subclasses, under
  the snake_case of their class name: that name is part of every built path).
  """

  BUILDER_CONFIGS = []  # Configs are made from the vidsim config, never picked by name.
  # No downloads, so no checksums file; this also skips TFDS's code_path lookup, which
  # needs the importlib_resources package that tfds does not install.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__, features=example_features())

  def build_description(self) -> str:
    """What a build makes, for the log line that opens it (preset, splits and sizes, source)."""
    raise NotImplementedError

  def build_report_text(self) -> str:
    """Lines `vidsim data prepare` prints after the split counts (none by default)."""
    return ""

  # TFDS announces every build with "Downloading and preparing dataset Unknown size
  # (download: Unknown size, ...)" and ends it with "downloaded and prepared to", printed
  # to stdout. vidsim's builders download nothing, so these two hooks (private in
  # TFDS: tests/test_data_builders.py checks that the TFDS lines stay away) say instead
  # what is being built and where.

  def _log_download_bytes(self) -> None:
    self._build_started = time.perf_counter()
    log.info("building dataset %s/%s in %s: %s", self.name, self.builder_config.name, self.data_dir,
             self.build_description())

  def _log_download_done(self) -> None:
    counts = ", ".join(f"{split} {info.num_examples}" for split, info in self.info.splits.items())
    seconds = time.perf_counter() - getattr(self, "_build_started", time.perf_counter())
    log.info("built dataset %s/%s in %.1f s: %s clips", self.name, self.builder_config.name, seconds, counts)
