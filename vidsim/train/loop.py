"""The training loop both stages share: resume, step, log, checkpoint, stop cleanly.

A stage hands in its pieces (a `StageSpec`): how to build the initial state, the
jitted-able step `(state, batch) -> (state, metrics)`, the data iterator and how to
turn its host batches into global arrays, and the FLOPs of a batch for MFU. This
file owns everything that is the same for both: auto-resume from the latest
checkpoint, one compiled step with explicit shardings and donated state, metrics to
JSONL and TensorBoard, async checkpoints, SIGTERM / preemption, non-finite steps.
"""

import dataclasses
import signal
from typing import Any, Callable, Optional

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import StoppedError, UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.train.checkpoint import Checkpointer, abstract_like, open_latest
from vidsim.train.metrics import MetricsWriter, StepTimer, peak_flops_per_s

log = get_logger("train")


class NonFiniteError(StoppedError):
  """Too many non-finite steps in a row: training stopped, last good checkpoint kept."""


@dataclasses.dataclass
class StageSpec:
  name: str  # Subdirectory of the workdir: "vae" or "dit".
  steps: int
  log_every: int
  checkpoint_every: int
  max_nonfinite_steps: int
  init_state: Callable[[], Any]  # Builds the initial train state (under the mesh).
  state_shardings: Any  # NamedShardings matching the state pytree.
  train_step: Callable  # (state, global_batch) -> (state, metrics); jitted here.
  data_iter: Any  # grain DatasetIterator of host-local batches (checkpointed).
  to_global: Callable  # host-local batch -> dict of global jax.Arrays for the step.
  batch_cost: Callable  # host-local batch -> (model FLOPs of the global step, dict of its counts, e.g. clips).
  every: list = dataclasses.field(default_factory=list)  # [(k, fn(state, step) -> metrics dict or None)] periodic hooks.
  before_final_save: Optional[Callable] = None  # state -> state at the last step (e.g. latent stats).
  summarize_units: Optional[Callable] = None  # summed counts since the last log -> extra metrics.


class _Preemption:
  """Turns SIGTERM into a flag the loop checks at each step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. inside a test runner thread).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, checkpointer, step) -> bool:
    """All processes must stop at the same step: any one's SIGTERM stops them all."""
    local = self.requested or checkpointer.reached_preemption(step)
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


def run(spec: StageSpec, config, workdir, mesh):
  """Trains a stage to `spec.steps`, resuming from its latest checkpoint. Returns the final state."""
  stage_dir = epath.Path(workdir) / spec.name
  stage_dir.mkdir(parents=True, exist_ok=True)
  if is_chief():
    config_lib.write_config(config, workdir)
  checkpointer = Checkpointer.from_config(stage_dir / "checkpoints", config)
  config_dict = config.to_dict()

  # ---------------------------------------------------------------- state: resume or init
  abstract_state = jax.eval_shape(spec.init_state)
  abstract_state = abstract_like(abstract_state, spec.state_shardings)
  latest = checkpointer.latest_step()
  if latest is not None:
    log.info("%s: resuming from step %d (%s)", spec.name, latest, checkpointer.directory)
    state = checkpointer.restore(latest, abstract_state, spec.data_iter)
  else:
    state = jax.jit(spec.init_state, out_shardings=spec.state_shardings)()
    if config.init_from:
      state = _load_weights(state, config.init_from, spec)
  step = int(mesh_lib.to_host(state["step"]))
  metrics_writer = MetricsWriter(stage_dir, resume_step=step)

  # ---------------------------------------------------------------- the compiled step
  jitted_step = jax.jit(spec.train_step, out_shardings=(spec.state_shardings, None), donate_argnums=0)
  peak = peak_flops_per_s(config)
  timer = StepTimer()
  window = _Window()
  metrics = {}

  bar = progress(total=spec.steps, initial=step, desc=f"train {spec.name}", unit="step")
  try:
    with _Preemption() as preemption:
      while step < spec.steps:
        host_batch = next(spec.data_iter)
        batch = spec.to_global(host_batch)
        state, step_metrics = jitted_step(state, batch)
        step += 1
        in_a_row = int(mesh_lib.to_host(state["nonfinite_in_a_row"]))
        elapsed = timer.lap()
        window.add(elapsed, *spec.batch_cost(host_batch))
        bar.update(1)

        if in_a_row >= spec.max_nonfinite_steps:
          raise NonFiniteError(
              f"{spec.name}: {in_a_row} non-finite steps in a row at step {step}; stopped. "
              f"The last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
              "Lower the learning rate or check the data."
          )
        hook_metrics, hooks_ran = {}, False
        for every, hook in spec.every:
          if every and step % every == 0:
            hook_metrics.update(hook(state, step) or {})
            hooks_ran = True
        if step % spec.log_every == 0 or step == spec.steps:
          metrics = {**_log_row(step_metrics, state, window, peak, spec.summarize_units), **hook_metrics}
          metrics_writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        elif hook_metrics:  # An eval off the logging grid gets a row of its own.
          metrics_writer.write(step, hook_metrics)

        if step == spec.steps and spec.before_final_save is not None:
          state = spec.before_final_save(state)
        preempted = preemption.agreed(checkpointer, step)
        saving = step % spec.checkpoint_every == 0 or step == spec.steps or preempted
        if saving:
          checkpointer.save(step, state, spec.data_iter, config_dict, metrics, force=True)
        if saving or hooks_ran:
          timer.restart()  # Samples, evals and saves are not the step: step_time_s and MFU measure training.
        if preempted:
          checkpointer.wait()
          log.warning("%s: preempted (SIGTERM); saved step %d, exiting cleanly", spec.name, step)
          break
  finally:
    bar.close()
    checkpointer.close()
    metrics_writer.close()
  return state


class _Window:
  """Step times and work since the last log line, for throughput and MFU."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.seconds, self.flops, self.steps, self.units = 0.0, 0.0, 0, {}

  def add(self, seconds, flops, units):
    if seconds is None:  # First step of the process: compilation, not throughput.
      return
    self.seconds += seconds
    self.flops += flops
    self.steps += 1
    for k, v in units.items():
      self.units[k] = self.units.get(k, 0) + v


def _log_row(step_metrics, state, window, peak, summarize_units=None):
  row = {k: float(v) for k, v in mesh_lib.to_host(step_metrics).items()}
  # A per-range loss over no tokens (flow.flow_loss: `loss_X` with `tokens_X` == 0) is
  # no measurement; logged as 0 it drew false dips in the curves.
  for key in [k for k in row if k.startswith("tokens_") and row[k] == 0]:
    row.pop("loss_" + key[len("tokens_"):], None)
  row["nonfinite_total"] = int(mesh_lib.to_host(state["nonfinite_total"]))
  if window.steps and summarize_units is not None:
    row.update(summarize_units(window.units))
  if window.steps:
    row["step_time_s"] = window.seconds / window.steps
    for name, count in window.units.items():
      row[f"{name}_per_s"] = count / window.seconds
    row["flops_per_step"] = window.flops / window.steps
    row["mfu"] = window.flops / window.seconds / peak
  window.reset()
  return row


def _load_weights(state, path, spec):
  """--config.init_from: model weights (params and EMA) from another run's checkpoint."""
  source = epath.Path(path)
  reader, step = open_latest((source, source / spec.name / "checkpoints", source / "checkpoints"),
                             spec.name, f"init_from={path} names no {spec.name} checkpoint")
  source = reader.directory
  saved = reader.saved_state_shapes(step)
  mismatched = _mismatches(state["params"], saved["params"])
  if mismatched:
    raise UsageError(f"init_from={source} (step {step}) does not fit this model:\n  " + "\n  ".join(mismatched))
  as_target = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  restored = reader.restore_subset(step, {"params": jax.tree.map(as_target, state["params"]),
                                          "ema": jax.tree.map(as_target, state["ema"])})
  reader.close()
  state = dict(state, params=restored["params"], ema=restored["ema"])
  log.info("%s: initialised weights from %s step %d", spec.name, source, step)
  return state


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


def job_mesh(config):
  """Start of every stage command: jax.distributed (if several processes), then the mesh."""
  mesh_lib.init_distributed(config)
  mesh = mesh_lib.make_mesh(config)
  log.info("mesh: %s", mesh_lib.describe(mesh))
  return mesh


def abstract_model(build, config, mesh):
  """(graphdef, abstract params, param shardings) of `build()` without allocating weights."""
  with mesh_lib.activate(mesh, config):
    abstract = nnx.eval_shape(build)
  graphdef, params, others, shardings = split_model(abstract, mesh, config)
  if jax.tree.leaves(others):
    raise TypeError(f"{type(abstract).__name__} must hold only nnx.Param variables, found {others}")
  return graphdef, params, shardings


def split_model(model, mesh, config):
  """(graphdef, params, others, param_shardings) of an NNX model, as plain dicts.

  Params train; `others` (non-Param variables) ride along unchanged. Plain dicts keep
  the train state a simple pytree for jit, optax and Orbax.
  """
  graphdef, params, others = nnx.split(model, nnx.Param, ...)
  shardings = mesh_lib.param_shardings(params, mesh, config)
  return graphdef, nnx.to_pure_dict(params), others, nnx.to_pure_dict(shardings)


def state_shardings(abstract_state, params, param_shardings, mesh):
  """Shardings for a whole train state: every subtree shaped like the params (params,
  EMA, optimizer moments) gets the params' shardings; everything else is replicated."""
  params_def = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def assign(subtree):
    if jax.tree.structure(subtree) == params_def:
      return param_shardings
    if isinstance(subtree, dict):
      return {k: assign(v) for k, v in subtree.items()}
    if isinstance(subtree, (list, tuple)):
      values = [assign(v) for v in subtree]
      return type(subtree)(*values) if hasattr(subtree, "_fields") else type(subtree)(values)
    return jax.tree.map(lambda _: replicated, subtree)

  return assign(abstract_state)
