"""The data layer: TFDS ArrayRecord datasets of pixels and the grain pipelines over them.

`dataset_spec(config)` is the registry entry of the dataset a config names (what it can
do: vidsim.data.registry); `builder_for(config)` its TFDS builder; `prepare(config)`
builds it (a second call reuses it); `built(config)` is what readers call: the builder
of a built dataset, building a missing one when its entry allows. The pipelines live in
`vidsim.data.pipeline`. Importing this package does not import TFDS.
"""

import logging
import os
import time

from vidsim.data.registry import DATASETS, DatasetSpec, dataset_spec
from vidsim.errors import UsageError
from vidsim.log import get_logger

__all__ = ["BUILDERS", "DATASETS", "DatasetSpec", "built", "builder_for", "data_dir", "dataset_spec",
           "prepare", "prepare_presets"]

log = get_logger("data")

# vidsim makes every TFDS builder config from its own config; TFDS warns about each one.
logging.getLogger("absl").addFilter(lambda r: not str(r.msg).startswith(("Using custom data configuration", "Variant folder")))

BUILDERS = tuple(DATASETS)
BUILD_WAIT_S = 3600.0  # How long processes other than 0 wait for process 0 to build a dataset.
_POLL_S = 1.0


def data_dir(config) -> str:
  """config.data.data_dir, else env VIDSIM_DATA_DIR, else ~/.cache/vidsim/datasets."""
  path = config.data.data_dir or os.environ.get("VIDSIM_DATA_DIR", "") or "~/.cache/vidsim/datasets"
  return os.path.abspath(os.path.expanduser(path))


def builder_for(config, builder_config: str = ""):
  """The TFDS builder a config names (nothing is built). builder_config overrides the preset."""
  return dataset_spec(config).builder(config, builder_config or config.data.builder_config, data_dir(config))


def prepare_presets(config) -> list:
  """The presets `vidsim data prepare` builds: all of them for data.builder_config='all'
  (datasets with presets), else [""] (the configured one)."""
  presets = dataset_spec(config).presets()
  return list(presets) if presets and config.data.builder_config == "all" else [""]


def prepare(config, builder_config: str = ""):
  """Builds the dataset if missing and returns its builder."""
  import tensorflow_datasets as tfds  # Heavy: only where a dataset is built.

  tfds.disable_progress_bar()  # The builders log what they build and how long it took.
  builder = builder_for(config, builder_config)
  builder.download_and_prepare()
  return builder


def built(config, process_index=None):
  """The builder of the dataset `config` names, built.

  A missing dataset whose registry entry has build_on_the_fly is built here by process 0
  while the others wait until it appears (TFDS renames a finished build into place, so
  the directory existing means the build is complete); this needs no collective, so it
  is safe wherever readers open a dataset. Other datasets: a UsageError naming
  `vidsim data prepare`. process_index defaults to jax.process_index().
  """
  builder = builder_for(config)
  if builder.is_prepared():
    return builder
  name = f"{builder.name}/{builder.builder_config.name}"
  if not dataset_spec(config).build_on_the_fly:
    raise UsageError(f"dataset {name} is not built in {builder.data_dir_root}: "
                     "run `vidsim data prepare --config <your config>` first")
  if process_index is None:
    import jax  # Only here: reading a built dataset needs no jax backend.

    process_index = jax.process_index()
  if process_index == 0:
    log.info("dataset %s is missing: building it now (`vidsim data prepare` builds it ahead)", name)
    return prepare(config)
  log.info("waiting for process 0 to build dataset %s in %s", name, builder.data_dir_root)
  deadline = time.monotonic() + BUILD_WAIT_S
  while time.monotonic() < deadline:
    time.sleep(_POLL_S)
    builder = builder_for(config)  # A fresh builder reads the info process 0 wrote.
    if builder.is_prepared():
      return builder
  raise UsageError(f"process {process_index} waited {BUILD_WAIT_S:g} s for process 0 to build dataset {name} "
                   f"in {builder.data_dir_root}; if data.data_dir is not shared by every host, run "
                   "`vidsim data prepare --config <your config>` on each host first")
