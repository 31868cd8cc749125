"""The datasets vidsim can build: one entry per `data.builder`.

An entry names the module of its TFDS builder and declares what code outside the data
layer may ask about the dataset, so no caller tests `data.builder == "..."`:

    spec = dataset_spec(config)   # UsageError listing the names for an unknown data.builder
    spec.world_truth              # score samples with digit_score, rewrite captions by the world's grammar?
    spec.build_on_the_fly         # may training build it when it is missing?
    spec.builder(config, preset)  # the TFDS builder (nothing built yet)

The builder module (imported only when a builder is asked for: TFDS is heavy) defines
`make_builder(config, preset, data_dir)` and, if the dataset has presets, `PRESETS`.
Adding a dataset is one entry here plus its module and test (docs/data.md, "Adding a
dataset").
"""

import dataclasses
import importlib

from vidsim.errors import UsageError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset: where its builder is and what it can do.

  world_truth: its clips come from the embedded world, so vidsim/digit_score.py can score
    generated clips against their prompts and its captions follow the world's grammar
    (moving_digits.COUNTERFACTUALS rewrite them): probe scoring and caption-gain
    evaluations apply.
  build_on_the_fly: building it takes seconds, so `train-vae`, `encode` and the other
    readers build it when it is missing instead of asking for `vidsim data prepare`.
  """

  name: str
  module: str  # Defines make_builder(config, preset, data_dir) and, optionally, PRESETS.
  summary: str
  world_truth: bool = False
  build_on_the_fly: bool = False

  def builder_module(self):
    return importlib.import_module(self.module)

  def presets(self) -> tuple:
    """The presets `data.builder_config` may name (empty: the dataset has none)."""
    return tuple(getattr(self.builder_module(), "PRESETS", ()))

  def builder(self, config, preset: str, data_dir: str):
    """The TFDS builder of `preset` (ignored by datasets without presets); nothing is built."""
    return self.builder_module().make_builder(config, preset, data_dir)


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="moving_digits",
            module="vidsim.data.moving_digits_tfds",
            summary="the embedded world: handwritten digits moving, rendered here (no download)",
            world_truth=True,
            # Rendered from bundled scans: seconds for the test and demo configs.
            build_on_the_fly=True,
        ),
        DatasetSpec(
            name="video_folder",
            module="vidsim.data.video_folder",
            summary="a folder of your videos and images, with JSONL captions",
            world_truth=False,
            # Decoding a folder can take minutes to hours, and its build report (skipped
            # files, refused caption lines) is worth reading before training on it:
            # `vidsim data prepare` builds it and prints the report.
            build_on_the_fly=False,
        ),
    )
}


def dataset_spec(config_or_name) -> DatasetSpec:
  """The entry of config.data.builder (or of a name), or a UsageError listing the valid names."""
  name = config_or_name if isinstance(config_or_name, str) else config_or_name.data.builder
  if name not in DATASETS:
    raise UsageError(f"data.builder={name!r}; valid: {list(DATASETS)}")
  return DATASETS[name]
