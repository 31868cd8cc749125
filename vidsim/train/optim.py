"""Optimizer, EMA and the guarded parameter update shared by both training stages.

A step whose loss or gradients are not finite changes nothing (params, optimizer
state and EMA stay as they were); it is counted, and the loop stops after
`max_nonfinite_steps` in a row with the last good checkpoint intact.
"""

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(section):
  """Linear warmup to the peak, then cosine decay to end_lr_fraction x peak."""
  peak = section.learning_rate
  end_fraction = section.get("end_lr_fraction", 0.1)
  warmup = min(section.warmup_steps, max(section.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(section.steps, warmup + 1),
      end_value=peak * end_fraction,
  )


def make_optimizer(section) -> optax.GradientTransformation:
  """AdamW with warmup-cosine schedule and optional global-norm clipping."""
  parts = []
  if section.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(section.grad_clip))
  parts.append(
      optax.adamw(
          learning_rate_schedule(section),
          b1=0.9,
          b2=section.get("beta2", 0.999),
          weight_decay=section.weight_decay,
      )
  )
  return optax.chain(*parts)


def init_train_state(params, optimizer, seed: int, **extra):
  """The pure pytree every stage checkpoints: params, opt_state, ema, step, rng, counters."""
  return dict(
      params=params,
      opt_state=optimizer.init(params),
      ema=jax.tree.map(jnp.copy, params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)),
      nonfinite_in_a_row=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
      **extra,
  )


def step_rng(state):
  """This step's randomness: a pure function of the seed and the step, so resume repeats it."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def ema_warmup_decay(ema_decay, step):
  """The EMA decay at optimizer step `step` (0-based): min(decay, (1 + step) / (10 + step)).

  A plain 0.999 EMA still holds 0.999^3000 = 5% of the random initial weights after
  3,000 steps, which short CPU runs sample from; the warmup (as in TF's
  ExponentialMovingAverage with num_updates) forgets them within a few hundred steps.
  """
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def apply_gradients(state, loss, grads, optimizer, ema_decay: float):
  """One guarded optimizer step. Returns (new_state, stats)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # Zero non-finite grads before the update so the discarded branch stays NaN-free too.
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt_state = optimizer.update(safe_grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  if ema_decay > 0:
    decay = ema_warmup_decay(ema_decay, state["step"])
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], new_params)
  else:
    new_ema = new_params

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = dict(state)
  new_state.update(
      params=keep_if_finite(new_params, state["params"]),
      opt_state=keep_if_finite(new_opt_state, state["opt_state"]),
      ema=keep_if_finite(new_ema, state["ema"]),
      step=state["step"] + 1,
      nonfinite_in_a_row=jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1),
      nonfinite_total=state["nonfinite_total"] + jnp.where(finite, 0, 1),
  )
  return new_state, dict(grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32))
