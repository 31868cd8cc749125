"""The data layer: TFDS ArrayRecord datasets of pixels and the grain pipelines over them.

`builder_for(config)` names the dataset a config asks for; `prepare(config)` builds it
(a second call reuses it). The pipelines live in `vidsim.data.pipeline`.
"""

import logging
import os

from vidsim.errors import UsageError

# vidsim makes every TFDS builder config from its own config; TFDS warns about each one.
logging.getLogger("absl").addFilter(lambda r: not str(r.msg).startswith(("Using custom data configuration", "Variant folder")))

BUILDERS = ("moving_digits", "video_folder")


def data_dir(config) -> str:
  """config.data.data_dir, else env VIDSIM_DATA_DIR, else ~/.cache/vidsim/datasets."""
  path = config.data.data_dir or os.environ.get("VIDSIM_DATA_DIR", "") or "~/.cache/vidsim/datasets"
  return os.path.abspath(os.path.expanduser(path))


def builder_for(config, builder_config: str = ""):
  """The TFDS builder a config names (not built yet). builder_config overrides the preset."""
  # TFDS imports are heavy; keep them out of `import vidsim.data`.
  name = config.data.builder
  if name == "moving_digits":
    from vidsim.data import moving_digits_tfds

    preset = builder_config or config.data.builder_config
    tfds_config = moving_digits_tfds.builder_config(preset, moving_digits_tfds.world_params(config))
    return moving_digits_tfds.MovingDigits(config=tfds_config, data_dir=data_dir(config), file_format="array_record")
  if name == "video_folder":
    from vidsim.data import video_folder

    return video_folder.make_builder(config, data_dir(config))
  raise UsageError(f"data.builder={name!r}; valid: {list(BUILDERS)}")


def prepare(config, builder_config: str = ""):
  """Builds the dataset if missing and returns its builder."""
  builder = builder_for(config, builder_config)
  builder.download_and_prepare()
  return builder

