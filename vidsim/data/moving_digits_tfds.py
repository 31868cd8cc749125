"""TFDS builder for the moving_digits world (ArrayRecord, no TensorFlow needed).

Builder configs (presets): fixed, mixed, images, occlusion. Their parameters come from
`config.moving_digits`; the built config's name is `<preset>-<hash of the parameters>`,
so changing a size, a count or the seed builds a new dataset instead of silently
reusing a stale one.

Every vidsim pixel dataset (this one and video_folder) shares one record schema,
`example_features()`: frames stored as encoded image bytes, one per frame.
"""

import dataclasses
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from vidsim.data import moving_digits
from vidsim.data.video_io import encode_image
from vidsim.errors import UsageError

PRESETS = ("fixed", "mixed", "images", "occlusion")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


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
  return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


@dataclasses.dataclass
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """A preset plus every parameter that changes the rendered data."""

  preset: str = "fixed"
  params: dict = dataclasses.field(default_factory=dict)


def world_params(config) -> dict:
  """The keys of config.moving_digits that determine the data, as plain JSON values."""
  md = config.moving_digits
  return dict(
      seed=int(md.seed), train_examples=int(md.train_examples), eval_examples=int(md.eval_examples),
      frames=int(md.frames), height=int(md.height), width=int(md.width), fps=float(md.fps),
      mixed_shapes=[list(map(int, s)) for s in md.mixed_shapes], digit_size=int(md.digit_size),
      max_digits=int(md.max_digits), speed=[float(s) for s in md.speed], colors=list(md.colors),
      occlusion_shape=list(map(int, md.occlusion_shape)), occluder_width=int(md.occluder_width),
      paths=str(md.paths),
  )


def builder_config(preset: str, params: dict) -> MovingDigitsConfig:
  if preset not in PRESETS:
    raise UsageError(f"data.builder_config={preset!r} is not a moving_digits config; valid: {list(PRESETS)}")
  relevant = dict(params, preset=preset)
  return MovingDigitsConfig(
      name=f"{preset}-{parameter_hash(relevant)}",
      description=f"moving_digits {preset}: {json.dumps(params, sort_keys=True)}",
      preset=preset,
      params=params,
  )


def render_example(preset: str, params: dict, split: str, index: int):
  """(video, caption, metadata) of example `index` of a split: a pure function of its inputs."""
  rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split], index])
  frames, height, width = params["frames"], params["height"], params["width"]
  occluder_width = 0
  if preset in ("mixed", "images"):
    shapes = params["mixed_shapes"]
    frames, height, width = shapes[int(rng.integers(len(shapes)))]
    frames = 1 if preset == "images" else frames
  elif preset == "occlusion":
    frames, height, width = params["occlusion_shape"]
    occluder_width = params["occluder_width"]
  return moving_digits.render_scene(
      rng, split=split, frames=frames, height=height, width=width, digit_size=params["digit_size"],
      max_digits=params["max_digits"], speed=params["speed"], colors=tuple(params["colors"]),
      occluder_width=occluder_width, paths=params["paths"],
  )


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits moving, bouncing and hiding, with captions and metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = []  # Configs are made from the vidsim config: see builder_config().
  # No downloads, so no checksums file; this also skips TFDS's code_path lookup, which
  # needs the importlib_resources package that tfds does not install.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=example_features())

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: sklearn bundles the digits.
    params = self.builder_config.params
    sizes = {"train": params["train_examples"], "validation": params["eval_examples"],
             "test": params["eval_examples"]}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, num_examples):
    preset, params = self.builder_config.preset, self.builder_config.params
    for index in range(num_examples):
      video, caption, metadata = render_example(preset, params, split, index)
      metadata["split"] = split
      yield index, make_record(video, caption, params["fps"], index, f"moving_digits/{preset}", metadata)
