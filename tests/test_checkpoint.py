"""Checkpointer pieces used outside the training loop: finding the latest checkpoint."""

import grain
import jax.numpy as jnp
import pytest

from vidsim.errors import UsageError
from vidsim.train import checkpoint as ckpt_lib


def _save_one(directory, step):
  saver = ckpt_lib.Checkpointer(directory, async_save=False)
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  saver.save(step, {"w": jnp.arange(3.0)}, data_iter, {"seed": 0}, {"loss": 1.0}, force=True)
  saver.close()


def test_open_latest_takes_the_first_candidate_with_a_checkpoint(tmp_path):
  _save_one(tmp_path / "run" / "dit" / "checkpoints", 7)
  empty = tmp_path / "empty"
  empty.mkdir()
  reader, step = ckpt_lib.open_latest([tmp_path / "missing", empty, tmp_path / "run" / "dit" / "checkpoints"], "DiT")
  assert step == 7
  assert reader.directory == tmp_path / "run" / "dit" / "checkpoints"
  reader.close()


def test_open_latest_names_the_paths_it_searched(tmp_path):
  with pytest.raises(UsageError, match=f"no VAE checkpoint in {tmp_path / 'nothing'}: train it first"):
    ckpt_lib.open_latest(tmp_path / "nothing", "VAE", "train it first")
