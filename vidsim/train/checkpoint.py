"""Orbax checkpoints for a training stage: one CheckpointManager per stage directory.

Items per step:
  state     train state pytree (params, opt_state, ema, step, rng), restored against
            abstract arrays that carry the CURRENT mesh's shardings, so a checkpoint
            written on one slice loads on another;
  data_iter the grain iterator state, one JSON per process (grain's Orbax handler, which
            restores onto another process count when every process saved the same
            state, as the pixel pipeline's global batch plan does);
  config    the resolved config (JSON);
  metrics   the last logged metrics (JSON).
Saves are async and commit atomically (Orbax writes to a temporary directory and
renames it); temporary directories left by a crash are removed at start.

On CPU with one process the Orbax call itself runs on one long-lived background thread
(`_Handoff`): the loop only pins the state's buffers and snapshots the iterator state.
"""

import concurrent.futures
import dataclasses
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger("checkpoint")

ITEMS = ("state", "data_iter", "config", "metrics")


class Checkpointer:
  """Saves and restores one stage's checkpoints under `directory`."""

  def __init__(self, directory, keep_last=3, keep_every=0, async_save=True, read_only=False, background_thread=True):
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    # Handlers named up front so a reader can ask for metadata or restore a subset.
    handlers = dict(
        state=_state_handler(),
        data_iter=ElasticIteratorHandler(),
        config=ocp.JsonCheckpointHandler(),
        metrics=ocp.JsonCheckpointHandler(),
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    # Only where pinning keeps donated buffers alive (CPU; elsewhere the host copy Orbax
    # makes inside save() must block anyway) and with one process: with several, Orbax's
    # barriers are device collectives, which must not race the train step's from another thread.
    eligible = jax.default_backend() == "cpu" and jax.process_count() == 1
    self._handoff = _Handoff() if background_thread and async_save and not read_only and eligible else None

  @classmethod
  def from_config(cls, directory, config):
    keep = config.checkpoint
    return cls(directory, keep.keep_last, keep.keep_every, keep.async_save)

  def latest_step(self):
    self._drain()
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config_dict: dict, metrics: dict, force=False):
    """Starts a save of `state` and the iterator's current position. Returns as soon as
    the next train step may overwrite (donate) `state`; the files are written meanwhile."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data_iter=IteratorSave(_IteratorSnapshot.of(data_iter)),  # The loop moves on before the write.
        config=ocp.args.JsonSave(config_dict),
        metrics=ocp.args.JsonSave(_jsonable(metrics)),
    )
    pins = _pin_host_views(state) if self._handoff is not None else None
    if pins is None:
      self._drain()
      self.manager.save(step, args=args, force=force)
    else:
      self._handoff.submit(lambda: self.manager.save(step, args=args, force=force), pins)

  def restore(self, step: int, abstract_state, data_iter):
    """Restores `state` onto the shardings in `abstract_state` and sets `data_iter`'s state."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=_restore_args(abstract_state)),
        data_iter=IteratorRestore(data_iter),
    )
    restored = self.manager.restore(step, args=args)
    return restored.state

  def restore_subset(self, step: int, abstract_subset):
    """Restores only the state entries in `abstract_subset` (e.g. EMA weights for sampling)."""
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract_subset, restore_args=_restore_args(abstract_subset), partial_restore=True))
    return self.manager.restore(step, args=args).state

  def saved_state_shapes(self, step: int):
    """The saved train state's tree of array metadata (shape, dtype), read without restoring."""
    return self.manager.item_metadata(step).state

  def restore_metrics(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore())).metrics

  def reached_preemption(self, step: int) -> bool:
    """jax's preemption sync point (wired by the TPU runtime); False elsewhere."""
    return self.manager.reached_preemption(step)

  def wait(self):
    """Blocks until every started save is committed; raises a background save's error."""
    self._drain()
    self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      if self._handoff is not None:
        self._handoff.shutdown()
      self.manager.close()

  def _drain(self):
    if self._handoff is not None:
      self._handoff.drain()


class _Handoff:
  """Runs Orbax's save() calls, in order, on one long-lived thread.

  Why not call Orbax from the loop: its save() starts ~10 threads and an event loop, and
  each thread start waits for a free core; right after an XLA step on a small CPU host
  that costs 15-40 ms apiece (docs/benchmarks.md, "Checkpoints"). A thread that already
  exists takes the whole call off the loop.
  """

  def __init__(self):
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save")
    self._pending = self._executor.submit(lambda: None)  # Starts the thread now, not at the first save.

  def submit(self, save, pins):
    self.drain()  # One save in flight at a time, as Orbax itself allows; re-raises its error.

    def run():
      try:
        save()  # Orbax holds its own host references once its synchronous part returns.
      finally:
        pins.clear()

    self._pending = self._executor.submit(run)

  def drain(self):
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def shutdown(self):
    self._executor.shutdown(wait=True)


def _pin_host_views(state):
  """Zero-copy host views of every local shard of `state` (CPU), or None if one cannot be had.

  While a view exists, XLA will not donate that buffer: the next train step writes fresh
  buffers instead of overwriting the ones being saved, so the checkpoint holds exactly
  this step's values (the same guarantee Orbax's own synchronous host transfer gives).
  """
  pins = []
  for leaf in jax.tree.leaves(state):
    if not isinstance(leaf, jax.Array):
      continue  # Host values are never donated.
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
      return None  # Typed PRNG keys have no host view.
    for shard in leaf.addressable_shards:
      view = np.asarray(shard.data)
      if view.size and view.ctypes.data != shard.data.unsafe_buffer_pointer():
        return None  # A copy would not stop the donation.
      pins.append(view)
  return pins


class _IteratorSnapshot:
  """The iterator's state at save time, in the form grain's handler writes (bytes of JSON)."""

  def __init__(self, state: bytes):
    self._state = state

  @classmethod
  def of(cls, iterator):
    state = iterator.get_state()
    return cls(state if isinstance(state, bytes) else json.dumps(state, indent=4).encode())

  def get_state(self) -> bytes:
    return self._state


def _state_handler():
  """Orbax's PyTree handler; with one process, without replica-parallel writes.

  Replica-parallel splits each replicated array into one slice per device so that several
  hosts share the writing; with one process the same process writes every slice, and the
  slices cost a compiled slice op per shape and device at the first save (tens of seconds
  for the VAE on 8 CPU devices)."""
  if jax.process_count() > 1:
    return ocp.PyTreeCheckpointHandler()
  handlers = ocp.type_handlers
  scalar = handlers.ScalarHandler()
  registry = handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, handlers.NumpyHandler()),
      (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
      (str, handlers.StringHandler()),
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def open_latest(candidates, what: str, hint: str = ""):
  """(read-only Checkpointer, latest step) of the first of `candidates` (checkpoint
  directories) that holds a complete checkpoint; otherwise a UsageError naming the paths."""
  candidates = [epath.Path(c) for c in ([candidates] if isinstance(candidates, (str, os.PathLike)) else candidates)]
  for directory in candidates:
    if not directory.exists():
      continue
    reader = Checkpointer(directory, read_only=True)
    step = reader.latest_step()
    if step is not None:
      return reader, step
    reader.close()
  where = " or ".join(str(c) for c in candidates)
  raise UsageError(f"no {what} checkpoint in {where}" + (f": {hint}" if hint else ""))


def restore_weights(candidates, what: str, hint: str, abstract_params, shardings, items=("ema",), extra=None):
  """The one way a trained model is loaded, for sampling, encoding and fine-tuning.

  Opens the latest complete checkpoint of the first of `candidates` that has one,
  checks the saved parameter names and shapes against the model's, and restores the
  state entries `items` (each shaped like the params: "params", "ema") onto
  `shardings` (a pytree like the params, or one Sharding for all; the CURRENT mesh's),
  plus `extra` (state entries given as abstract arrays with their shardings).
  Returns (restored dict, step, checkpoint directory).
  """
  reader, step = open_latest(candidates, what, hint)
  try:
    saved = reader.saved_state_shapes(step)
    mismatched = [problem for item in items for problem in _mismatches(abstract_params, saved[item])]
    if mismatched:
      raise UsageError(f"the {what} checkpoint in {reader.directory} (step {step}) does not fit this model:"
                       "\n  " + "\n  ".join(mismatched))
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract_params)
    target = {item: abstract_like(abstract_params, shardings) for item in items}
    restored = reader.restore_subset(step, {**target, **(extra or {})})
    return restored, step, reader.directory
  finally:
    reader.close()


def _mismatches(current, saved) -> list:
  """Human-readable differences in parameter names and shapes."""
  current_flat, saved_flat = _by_name(current), _by_name(saved)
  problems = []
  for name, value in current_flat.items():
    if name not in saved_flat:
      problems.append(f"{name}: missing in checkpoint")
    elif tuple(saved_flat[name].shape) != tuple(value.shape):
      problems.append(f"{name}: checkpoint {tuple(saved_flat[name].shape)} vs model {tuple(value.shape)}")
  problems += [f"{name}: in checkpoint, not in model" for name in saved_flat if name not in current_flat]
  return problems


def _by_name(tree) -> dict:
  """{'decoder/blocks/0/conv1/kernel': leaf}: list indices and dict keys alike (Orbax saves both as str)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return {name(path): leaf for path, leaf in flat}


def absolute(path) -> epath.Path:
  """Orbax wants absolute paths: local paths are made absolute, gs:// and other URLs kept."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _restore_args(abstract):
  """Per-array restore arguments carrying each target's sharding (the new mesh's)."""
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _jsonable(metrics: dict) -> dict:
  return {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}


class ElasticIteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler, plus restore onto a different process count.

  Saved states are per process (`process_i-of-n.json`). When the job comes back with
  another process count and every saved state is the same (the iterator plans global
  batches identically in each process and keeps no per-process position), that state
  is the state of every new process. Otherwise there is no exact answer, and it says so.
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item)
    saved = sorted(epath.Path(directory).glob("process_*-of-*.json"))
    states = {f.read_text() for f in saved}
    if len(states) != 1:
      raise ValueError(
          f"data iterator state in {directory} was saved by {len(saved)} processes with different positions; "
          f"it cannot be resumed exactly on {jax.process_count()} processes. Resume on the original process count."
      )
    item.set_state(json.loads(states.pop()))
    return item


@ocp.args.register_with_handler(ElasticIteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ElasticIteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any
