"""Checkpointer: async saves that the next (donating) step cannot corrupt, finding the latest checkpoint."""

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

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


def _sharded_state(mesh):
  sharding = NamedSharding(mesh, PartitionSpec("data", None))
  make = jax.jit(lambda: {"w": jnp.arange(64.0).reshape(8, 8), "step": jnp.zeros((), jnp.int32)},
                 out_shardings={"w": sharding, "step": NamedSharding(mesh, PartitionSpec())})
  return make(), sharding


def test_a_save_keeps_the_values_of_its_step_while_the_next_steps_donate_the_state(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  state, sharding = _sharded_state(mesh)
  train_step = jax.jit(lambda s: {"w": s["w"] * 3.0 + 1.0, "step": s["step"] + 1}, donate_argnums=0)
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(data_iter)
  saver = ckpt_lib.Checkpointer(tmp_path / "c", async_save=True)
  orbax_save = saver.manager.save

  def late_save(*args, **kwargs):  # A busy host: Orbax gets to the arrays after the steps below.
    time.sleep(0.5)
    return orbax_save(*args, **kwargs)

  saver.manager.save = late_save
  expected = np.asarray(state["w"]).copy()
  saver.save(1, state, data_iter, {}, {}, force=True)
  for _ in range(3):  # The loop goes on at once: consumes data and overwrites the state.
    next(data_iter)
    state = train_step(state)
  jax.block_until_ready(state)
  saver.close()

  reader = ckpt_lib.Checkpointer(tmp_path / "c", read_only=True)
  target = ckpt_lib.abstract_like(state, {"w": sharding, "step": state["step"].sharding})
  resumed_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  restored = reader.restore(1, target, resumed_iter)
  reader.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
  assert int(restored["step"]) == 0
  assert next(resumed_iter) == 1  # The position at save time, not after the later steps.


def test_a_failed_background_save_is_raised_by_the_loop(tmp_path):
  saver = ckpt_lib.Checkpointer(tmp_path / "c", async_save=True)
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  saver.save(1, {"w": jnp.ones(3)}, data_iter, {}, {"bad": object()}, force=True)  # Not JSON.
  with pytest.raises(TypeError):
    saver.wait()
  saver.close()
