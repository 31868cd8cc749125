"""Stage 2: train the DiT on the latent cache (`vidsim train --config F --workdir W`).

Reads top to bottom: mesh, the VAE the cache must come from, input (latent cache ->
packed rows), model, update step (rectified flow, gradient accumulation), hooks
(sample videos), then the shared loop. Outputs under W/dit/.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vidsim import flow
from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim.data import packing
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.models import dit as dit_lib
from vidsim.models import flops as flops_lib
from vidsim.train import dit_eval, loop, optim

log = get_logger("dit")

STAGE = "dit"


def run_train(args, config):
  train_dit(config, args.workdir, loop.job_mesh(config))


def build_dit(config):
  return dit_lib.DiT(config, rngs=nnx.Rngs(config.seed))


def abstract_dit(config, mesh):
  """(graphdef, abstract params, param shardings) without allocating the weights."""
  return loop.abstract_model(functools.partial(build_dit, config), config, mesh)


def check_cache(config, workdir, mesh):
  """The cache's manifest, after checking it was made by the configured VAE."""
  from vidsim.train.vae_loop import TrainedVAE

  vae = TrainedVAE(config, workdir, mesh)
  manifest = latents_lib.load_manifest(workdir, expected_fingerprint=vae.fingerprint)
  if manifest["text_encoder"] != config.text.encoder:
    raise UsageError(
        f"latent cache holds text for encoder {manifest['text_encoder']!r}, config.text.encoder is "
        f"{config.text.encoder!r}: re-encode or change the config"
    )
  return manifest


def packed_batches(config, workdir, split, manifest, rows_multiple, seed):
  """Iterator of this process's rows of globally planned packed batches; its state is one
  global stream position, so it resumes on any process count (vidsim/data/packing.py)."""
  tc = config.train
  # Each micro-batch splits over the data-parallel devices; each process holds whole rows.
  multiple = math.lcm(rows_multiple * tc.grad_accum, jax.process_count())
  if tc.rows_per_batch % multiple:
    raise UsageError(
        f"train.rows_per_batch={tc.rows_per_batch} must be a multiple of {multiple}: of the data-parallel size "
        f"({rows_multiple}) x train.grad_accum ({tc.grad_accum}), and of the process count ({jax.process_count()})"
    )
  return iter(latents_lib.packed_latents(config, workdir, split, manifest, seed=seed))


def train_dit(config, workdir, mesh):
  tc = config.train
  with mesh_lib.activate(mesh, config):
    # ------------------------------------------------------------ input
    manifest = check_cache(config, workdir, mesh)
    dp = mesh_lib.data_parallel_size(mesh, config)
    train_data = packed_batches(config, workdir, config.data.train_split, manifest, dp, config.seed)

    # ------------------------------------------------------------ model and optimizer
    graphdef, abstract_params, param_shardings = abstract_dit(config, mesh)
    optimizer = optim.make_optimizer(tc)

    init_state = functools.partial(init_dit_state, config, optimizer)
    state_shardings = loop.state_shardings(jax.eval_shape(init_state), abstract_params, param_shardings, mesh)
    train_step = make_train_step(config, graphdef, optimizer)

    # ------------------------------------------------------------ batches onto the mesh, and their cost
    def to_global(host_batch):
      return mesh_lib.make_global_batch(packing.model_inputs(host_batch), mesh, config)

    def batch_cost(host_batch):
      # Each process holds different rows (other segment lengths, other padding), so the
      # global step's FLOPs and tokens are sums over processes (one gather), not local x count.
      segment_ids = host_batch["segment_ids"]
      flops, real, slots = _sum_over_processes(
          [flops_for_batch(config, host_batch), np.sum(segment_ids > 0), segment_ids.size])
      return float(flops), {"tokens": int(real), "token_slots": int(slots)}

    def packing_efficiency(units):
      return {"packing_efficiency": units["tokens"] / max(units["token_slots"], 1)}

    spec = loop.StageSpec(
        name=STAGE, steps=tc.steps, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
        max_nonfinite_steps=tc.max_nonfinite_steps, init_state=init_state,
        state_shardings=state_shardings, train_step=train_step, data_iter=train_data,
        to_global=to_global, batch_cost=batch_cost,
        summarize_units=packing_efficiency,
        every=dit_eval.held_out_hooks(config, workdir, mesh, graphdef, manifest)
        + sample_hooks(config, workdir, mesh, graphdef),
    )
    return loop.run(spec, config, workdir, mesh)


def _sum_over_processes(local):
  """A host value (scalar or 1-D) summed over all processes (a tiny host all-gather)."""
  local = np.asarray(local, np.float64)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def init_dit_state(config, optimizer):
  _, params = nnx.split(build_dit(config), nnx.Param)
  return optim.init_train_state(nnx.to_pure_dict(params), optimizer, config.seed)


def make_train_step(config, graphdef, optimizer):
  """The pure step (state, packed global batch) -> (state, metrics): rectified flow."""
  tc = config.train

  def loss_fn(params, batch, rng):
    inputs = flow.flow_training_inputs(rng, batch, config)
    model = nnx.merge(graphdef, params)
    v_pred = model(inputs["x_t"], inputs["t"], batch["positions"], batch["segment_ids"],
                   packing.text_inputs(batch), inputs["drop_text"])
    return flow.flow_loss(v_pred, inputs["v_target"], inputs["loss_mask"], inputs["t"])

  def train_step(state, batch):
    rng = optim.step_rng(state)
    loss, metrics, grads = accumulate_gradients(loss_fn, state["params"], batch, rng, tc.grad_accum)
    state, stats = optim.apply_gradients(state, loss, grads, optimizer, tc.ema_decay)
    return state, {**metrics, **stats}

  return train_step


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


def flops_for_batch(config, host_batch) -> float:
  """Model FLOPs of one host batch's train step (see vidsim/models/flops.py)."""
  rows, row_tokens = host_batch["segment_ids"].shape
  text_tokens = host_batch["text_mask"].shape[1] * host_batch["text_mask"].shape[2]
  segments = host_batch["segment_frames"].shape[1]
  return flops_lib.dit_flops_per_step(config, rows, row_tokens, text_tokens, segments)


def sample_hooks(config, workdir, mesh, graphdef):
  """Periodic sample videos for fixed prompts (wired once `vidsim sample` exists)."""
  if not config.train.sample_every:
    return []
  try:
    from vidsim import sample as sample_lib
  except ImportError:
    log.warning("train.sample_every is set but vidsim.sample is not built yet: no periodic samples")
    return []
  return [(config.train.sample_every, functools.partial(sample_lib.training_samples, config, workdir, mesh, graphdef))]
