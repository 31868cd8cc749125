"""The DiT's update step: rectified flow on packed rows, with gradient accumulation.

`init_state(config, optimizer)` builds the train state; `make_train_step(config,
graphdef, optimizer)` returns the pure `(state, batch) -> (state, metrics)` that the
loop, `vidsim bench` and `vidsim compile` all jit; `flops_for_batch` counts its work (useful or executed).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vidsim import flow
from vidsim import mesh as mesh_lib
from vidsim.data import packing
from vidsim.errors import UsageError
from vidsim.models import build
from vidsim.models import dit as dit_lib
from vidsim.models import flops as flops_lib
from vidsim.train import optim


def init_state(config, optimizer):
  _, params = nnx.split(build.build_dit(config), nnx.Param)
  return optim.init_train_state(nnx.to_pure_dict(params), optimizer, config.seed)


def make_train_step(config, graphdef, optimizer):
  """The pure step (state, packed global batch) -> (state, metrics): rectified flow."""
  tc = config.train
  blocks = config.dit.get("segment_blocks", 0)

  def loss_fn(params, batch, rng, path):
    inputs = flow.flow_training_inputs(rng, batch, config)
    model = nnx.merge(graphdef, params)
    v_pred = model(inputs["x_t"], inputs["t"], batch["positions"], batch["segment_ids"],
                   packing.text_inputs(batch), inputs["drop_text"], path=path, slot_tokens=batch.get("slot_tokens"))
    return flow.flow_loss(v_pred, inputs["v_target"], inputs["loss_mask"], inputs["t"])

  def gradients(params, batch, rng, path):
    return accumulate_gradients(functools.partial(loss_fn, path=path), params, batch, rng, tc.grad_accum)

  def train_step(state, batch):
    rng = optim.step_rng(state)
    segment_ids = batch["segment_ids"]
    if dit_lib.blocked_path_possible(blocks, segment_ids.shape[1]):
      # The path is chosen around the gradient, not inside the model's forward: a
      # differentiated cond would fill the other path's residuals with zeros every step.
      aligned = dit_lib.segments_in_blocks(segment_ids.astype(jnp.int32), blocks, batch["segment_frames"].shape[1])
      loss, metrics, grads = jax.lax.cond(
          aligned, functools.partial(gradients, path="blocked"), functools.partial(gradients, path="dense"),
          state["params"], batch, rng)
    else:
      loss, metrics, grads = gradients(state["params"], batch, rng, "dense")
    state, stats = optim.apply_gradients(state, loss, grads, optimizer, tc.ema_decay)
    return state, {**metrics, **stats}

  return train_step


def check_rows_per_batch(config, mesh, processes: int = 1):
  """UsageError (exit 2) unless train.rows_per_batch splits over the mesh's data-parallel
  devices in train.grad_accum micro-batches, and into whole rows for each process."""
  tc = config.train
  data_parallel = mesh_lib.data_parallel_size(mesh, config)
  multiple = math.lcm(data_parallel * tc.grad_accum, processes)
  if tc.rows_per_batch % multiple:
    raise UsageError(
        f"train.rows_per_batch={tc.rows_per_batch} must be a multiple of {multiple}: of the data-parallel size "
        f"of mesh {mesh_lib.describe(mesh)} (data x fsdp = {data_parallel}) x train.grad_accum ({tc.grad_accum}), "
        f"and of the process count ({processes}); use train.rows_per_batch={-(-tc.rows_per_batch // multiple) * multiple}"
        f" or a mesh whose data x fsdp divides it")


def accumulate_gradients(loss_fn, params, batch, rng, steps: int):
  """Mean loss, metrics and gradients over `steps` micro-batches (rows split evenly),
  one micro-batch live at a time, so memory is that of one micro-batch."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, metrics, grads
  micro = jax.tree.map(lambda x: x.reshape((steps, x.shape[0] // steps) + x.shape[1:]), batch)

  def body(carry, inputs):
    index, micro_batch = inputs
    (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)))
  (loss, metrics), grads = zeros
  (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(steps), micro))
  scale = 1.0 / steps
  return loss * scale, jax.tree.map(lambda m: m * scale, metrics), jax.tree.map(lambda g: g * scale, grads)


def flops_for_batch(config, host_batch, kind: str = "useful") -> float:
  """Model FLOPs of one host batch's train step: the useful work (what MFU is quoted
  against) or what the step executes (see vidsim/models/flops.py)."""
  return flops_lib.work_flops(config, flops_lib.batch_work(config, host_batch, kind))
