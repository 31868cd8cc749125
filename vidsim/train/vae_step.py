"""The VAE's update step: reconstruction + beta KL on a batch of same-shape clips.

`init_state(config, optimizer)` builds the train state (with the latent statistics
the DiT stage reads); `make_train_step(config, graphdef, optimizer)` returns the pure
`(state, {"video"}) -> (state, metrics)` that the loop, `vidsim bench` and
`vidsim compile` all jit.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from vidsim.models import build
from vidsim.models import vae as vae_lib
from vidsim.train import optim


def init_state(config, optimizer):
  _, params = nnx.split(build.build_vae(config), nnx.Param)
  channels = config.vae.latent_channels
  return optim.init_train_state(
      nnx.to_pure_dict(params), optimizer, config.seed,
      latent_shift=jnp.zeros((channels,), jnp.float32),
      latent_scale=jnp.ones((channels,), jnp.float32),
  )


def make_train_step(config, graphdef, optimizer):
  """The pure step (state, {"video"}) -> (state, metrics): reconstruction + beta KL."""

  def train_step(state, batch):
    rng = optim.step_rng(state)

    def loss_fn(params):
      return vae_lib.vae_loss(nnx.merge(graphdef, params), batch["video"], rng, config)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    state, stats = optim.apply_gradients(state, loss, grads, optimizer, config.vae_train.ema_decay)
    return state, {**metrics, **stats}

  return train_step
