"""The training loop both stages share: resume, step, log, checkpoint, stop cleanly.

A stage hands in its pieces (a `StageSpec`): how to build the initial state, the
jitted-able step `(state, batch) -> (state, metrics)`, the data iterator and how to
turn its host batches into global arrays, and the FLOPs of a batch for MFU. This
file owns everything that is the same for both: auto-resume from the latest
checkpoint, one compiled step with explicit shardings and donated state, metrics to
JSONL and TensorBoard, async checkpoints, SIGTERM / preemption, non-finite steps.
"""

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import StoppedError, UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.quick_jit import quick_jit
from vidsim.train import goodput
from vidsim.train.checkpoint import Checkpointer, abstract_like, restore_weights
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
  batch_cost: Callable  # host-local batch -> (its model FLOPs, dict of its counts, e.g. clips); summed over processes.
  every: list = dataclasses.field(default_factory=list)  # [(k, fn(state, step) -> metrics dict or None)] periodic hooks.
  before_final_save: Optional[Callable] = None  # state -> state at the last step (e.g. latent stats).
  summarize_units: Optional[Callable] = None  # summed counts since the last log -> extra metrics.


class _Preemption:
  """Turns SIGTERM into a flag the loop checks at step boundaries."""

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

  def agreed(self, checkpointer, step, sync: bool) -> bool:
    """All processes must stop at the same step. jax's preemption sync point (TPU) is
    the same step everywhere by construction and is asked every step; a SIGTERM seen by
    one process is shared by an all-gather, only where `sync` (log and checkpoint steps)."""
    if checkpointer.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return self.requested
    return sync and bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


class _NonfiniteWatch:
  """The longest run of non-finite steps, tracked on the device between host checks.

  The step counts `nonfinite_in_a_row` in the state; reading it every step would make
  the host wait for every step. Instead a tiny jitted update keeps the first step at
  which the run reached the limit, and the host reads it at log and checkpoint steps,
  before any save, so no checkpoint is written after the limit was reached.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.first_step = jnp.asarray(-1, jnp.int32)
    self.peak = jnp.asarray(0, jnp.int32)

    @jax.jit
    def update(first_step, peak, in_a_row, step):
      reached = (in_a_row >= limit) & (first_step < 0)
      return jnp.where(reached, step, first_step), jnp.where(first_step < 0, jnp.maximum(peak, in_a_row), peak)

    self._update = update

  def add(self, state, step: int):
    self.first_step, self.peak = self._update(self.first_step, self.peak, state["nonfinite_in_a_row"], step)

  def check(self, spec, checkpointer):
    first_step, peak = (int(x) for x in mesh_lib.to_host((self.first_step, self.peak)))
    if first_step >= 0:
      raise NonFiniteError(
          f"{spec.name}: {peak} non-finite steps in a row at step {first_step}; stopped. "
          f"The last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
          "Lower the learning rate or check the data."
      )


def run(spec: StageSpec, config, workdir, mesh):
  """Trains a stage to `spec.steps`, resuming from its latest checkpoint. Returns the final state.

  The host reads values from the devices only at log and checkpoint steps (metrics,
  the non-finite watch, the preemption agreement between processes), so it prepares the
  next batches while the devices still run earlier steps.
  """
  stage_dir = epath.Path(workdir) / spec.name
  stage_dir.mkdir(parents=True, exist_ok=True)
  if is_chief():
    config_lib.write_config(config, workdir)
  checkpointer = Checkpointer.from_config(stage_dir / "checkpoints", config)
  config_dict = config.to_dict()

  # ---------------------------------------------------------------- state: resume or init
  latest = checkpointer.latest_step()
  recorder = goodput.Recorder(stage_dir, resume_step=latest or 0)
  with recorder.phase("restore"):
    abstract_state = jax.eval_shape(spec.init_state)
    abstract_state = abstract_like(abstract_state, spec.state_shardings)
    if latest is not None:
      log.info("%s: resuming from step %d (%s)", spec.name, latest, checkpointer.directory)
      state = checkpointer.restore(latest, abstract_state, spec.data_iter)
    else:
      state = quick_jit(spec.init_state, out_shardings=spec.state_shardings)()
      if config.init_from:
        state = _load_weights(state, config.init_from, spec)
    step = int(mesh_lib.to_host(state["step"]))
  metrics_writer = MetricsWriter(stage_dir, resume_step=step)

  # ---------------------------------------------------------------- the compiled step
  jitted_step = jax.jit(spec.train_step, out_shardings=(spec.state_shardings, None), donate_argnums=0)
  peak = peak_flops_per_s(config)
  timer = StepTimer()
  window = _Window()
  watch = _NonfiniteWatch(spec.max_nonfinite_steps)
  metrics = {}

  profiler = _Profiler(config, stage_dir / "profile")
  bar = progress(total=spec.steps, initial=step, desc=f"train {spec.name}", unit="step")
  try:
    with _Preemption() as preemption:
      while step < spec.steps:
        mark = recorder.iteration()
        data_begin = time.perf_counter()
        with recorder.phase("data"):
          host_batch = next(spec.data_iter)
          batch = spec.to_global(host_batch)
        data_seconds = time.perf_counter() - data_begin
        profiler.before(step + 1)
        if timer.first:
          with recorder.phase("compile"):
            state, step_metrics = jitted_step(state, batch)
            jax.block_until_ready(step_metrics)
        else:
          with profiler.annotate(step + 1):
            state, step_metrics = jitted_step(state, batch)
        step += 1
        profiler.after(step, state)
        watch.add(state, step)
        logging = step % spec.log_every == 0 or step == spec.steps
        checkpointing = step % spec.checkpoint_every == 0 or step == spec.steps
        if logging:
          jax.block_until_ready(step_metrics)  # The window's time ends when its last step does.
        window.add(timer.lap(), *spec.batch_cost(host_batch), data_seconds=data_seconds)
        bar.update(1)
        if logging or checkpointing:
          watch.check(spec, checkpointer)

        hook_metrics, hooks_ran = {}, False
        with recorder.phase("hooks"):
          for every, hook in spec.every:
            if every and step % every == 0:
              hook_metrics.update(hook(state, step) or {})
              hooks_ran = True
        if logging:
          metrics = {**_log_row(step_metrics, state, window, peak, spec.summarize_units), **hook_metrics}
          metrics_writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        elif hook_metrics:  # An eval off the logging grid gets a row of its own.
          metrics_writer.write(step, hook_metrics)

        if step == spec.steps and spec.before_final_save is not None:
          state = spec.before_final_save(state)
        preempted = preemption.agreed(checkpointer, step, sync=logging or checkpointing)
        saving = checkpointing or preempted
        if saving:
          with recorder.phase("checkpoint"):
            checkpointer.save(step, state, spec.data_iter, config_dict, metrics, force=True)
        if saving or hooks_ran:
          timer.restart()  # Samples, evals and saves are not the step: step_time_s and MFU measure training.
        recorder.end_iteration(mark)
        if logging or saving:
          recorder.snapshot(step)
        if preempted:
          with recorder.phase("checkpoint"):
            checkpointer.wait()
          log.warning("%s: preempted (SIGTERM); saved step %d, exiting cleanly", spec.name, step)
          break
    with recorder.phase("checkpoint"):
      checkpointer.wait()
    recorder.snapshot(step, done=True)
  finally:
    profiler.close()
    bar.close()
    checkpointer.close()
    metrics_writer.close()
  return state


def profile_steps(config):
  """config.profile.steps "A,B" (or "A") -> (A, B), 1-based and inclusive; None when empty."""
  text = str(config.get("profile", {}).get("steps", "") or "").strip()
  if not text:
    return None
  try:
    bounds = tuple(int(part) for part in text.split(","))
  except ValueError:
    bounds = ()
  if len(bounds) == 1:
    bounds = bounds * 2
  if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
    raise UsageError(f"profile.steps={text!r}: use 'A,B' with 1 <= A <= B (steps A to B), 'A', or '' (off)")
  return bounds


class _Profiler:
  """A jax profiler trace of the steps in config.profile.steps, written under `directory`
  (jax.profiler.start_trace / stop_trace; TensorBoard's profile plugin and XProf read it).
  The trace stops after the last step's results are ready, so its device work is inside."""

  def __init__(self, config, directory):
    self.bounds = profile_steps(config)
    self.directory = directory
    self.active = False

  def before(self, step):
    if self.bounds and step == self.bounds[0] and not self.active:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True
      log.info("profiling steps %d-%d into %s", *self.bounds, self.directory)

  def annotate(self, step):
    """Marks a step in the trace (XProf's step-time view groups by it)."""
    if self.active:
      return jax.profiler.StepTraceAnnotation("train", step_num=step)
    return contextlib.nullcontext()

  def after(self, step, state):
    if self.active and step >= self.bounds[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile written to %s", self.directory)


class _Window:
  """Step times and work since the last log line, for throughput and MFU."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.seconds, self.flops, self.steps, self.units, self.data_seconds = 0.0, 0.0, 0, {}, 0.0

  def add(self, seconds, flops, units, data_seconds=0.0):
    if seconds is None:  # First step of the process: compilation, not throughput.
      return
    self.seconds += seconds
    self.data_seconds += data_seconds
    self.flops += flops
    self.steps += 1
    for k, v in units.items():
      self.units[k] = self.units.get(k, 0) + v

  def sum_over_processes(self):
    """Each process added its own batches' work: the job's is their sum."""
    names = sorted(self.units)
    totals = _sum_over_processes([self.flops] + [self.units[k] for k in names])
    self.flops = float(totals[0])
    self.units = {k: type(self.units[k])(v) for k, v in zip(names, totals[1:])}


def _sum_over_processes(local):
  """Host values summed over all processes (one tiny host all-gather)."""
  local = np.asarray(local, np.float64)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def _log_row(step_metrics, state, window, peak, summarize_units=None):
  window.sum_over_processes()
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
    # Of which the host waited for the next batch (and put it on the devices): a
    # data-bound run shows itself here.
    row["data_wait_s"] = window.data_seconds / window.steps
    for name, count in window.units.items():
      row[f"{name}_per_s"] = count / window.seconds
    row["flops_per_step"] = window.flops / window.steps
    row["mfu"] = window.flops / window.seconds / peak
  window.reset()
  return row


def _load_weights(state, path, spec):
  """--config.init_from: model weights (params and EMA) from another run's checkpoint."""
  source = epath.Path(path)
  params = state["params"]
  restored, step, directory = restore_weights(
      (source, source / spec.name / "checkpoints", source / "checkpoints"), spec.name,
      f"init_from={path} names no {spec.name} checkpoint",
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
      jax.tree.map(lambda x: x.sharding, params), items=("params", "ema"))
  log.info("%s: initialised weights from %s step %d", spec.name, directory, step)
  return dict(state, params=restored["params"], ema=restored["ema"])
