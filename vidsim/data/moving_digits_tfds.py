"""TFDS builder for the moving_digits world (ArrayRecord, no TensorFlow needed).

Builder configs (presets): fixed, mixed, images, occlusion. Their parameters come from
`config.moving_digits`; the built config's name is `<preset>-<hash of the parameters>`,
so changing a size, a count or the seed builds a new dataset instead of silently
reusing a stale one. Records follow the shared schema of vidsim.data.records.
"""

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from vidsim.data import moving_digits
from vidsim.data.records import PixelDatasetBuilder, make_record, parameter_hash
from vidsim.errors import UsageError

PRESETS = ("fixed", "mixed", "images", "occlusion")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """A preset plus every parameter that changes the rendered data."""

  preset: str = "fixed"
  params: dict = dataclasses.field(default_factory=dict)


def world_params(config) -> dict:
  """The keys of config.moving_digits that determine the data, as plain JSON values."""
  md = config.moving_digits
  # Only a non-default caption style is a parameter: datasets built before the key existed keep their names.
  captions = {} if md.captions == "default" else {"captions": str(md.captions)}
  return captions | dict(
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
      occluder_width=occluder_width, paths=params["paths"], captions=params.get("captions", "default"),
  )


def make_builder(config, preset: str, data_dir: str) -> "MovingDigits":
  """The builder of `preset` (a name in PRESETS) with the parameters of config.moving_digits."""
  tfds_config = builder_config(preset, world_params(config))
  return MovingDigits(config=tfds_config, data_dir=data_dir, file_format="array_record")


def split_sizes(params: dict) -> dict:
  return {"train": params["train_examples"], "validation": params["eval_examples"], "test": params["eval_examples"]}


class MovingDigits(PixelDatasetBuilder):
  """Handwritten digits moving, bouncing and hiding, with captions and metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def build_description(self) -> str:
    sizes = ", ".join(f"{split} {n}" for split, n in split_sizes(self.builder_config.params).items())
    return f"preset {self.builder_config.preset}, {sizes} clips rendered from the bundled digit scans"

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: sklearn bundles the digits.
    return {split: self._generate_examples(split, n) for split, n in split_sizes(self.builder_config.params).items()}

  def _generate_examples(self, split, num_examples):
    preset, params = self.builder_config.preset, self.builder_config.params
    for index in range(num_examples):
      video, caption, metadata = render_example(preset, params, split, index)
      metadata["split"] = split
      yield index, make_record(video, caption, params["fps"], index, f"moving_digits/{preset}", metadata)
