"""Rectified flow over packed tokens: timesteps, conditioning frames, noising, loss, ODE samplers.

x_t = (1 - t) x0 + t eps, with x0 the clean latent patches and eps ~ N(0, I); the
model predicts the velocity v = dx_t/dt = eps - x0. Sampling integrates the ODE
from t = 1 (noise) to t = 0 (data). Every token carries its own t: clean
conditioning tokens have t = 0 and no loss, which is how one model serves
text-to-video, image-to-video, extension and connecting (vidsim/tasks.py).

All functions are pure jax and jittable; randomness comes only from the rng passed in.
Shapes follow the packed batch (vidsim/data/packing.py): R rows, L tokens, K segments.
"""

import jax
import jax.numpy as jnp

from vidsim.errors import UsageError

# Timestep ranges for the per-range loss metrics: [0, .25), [.25, .5), [.5, .75), [.75, 1].
LOSS_T_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLERS = ("euler", "heun")


# ------------------------------------------------------------------ timesteps


def segment_token_counts(segment_ids, num_segments: int):
  """int32 [R, K]: tokens of segment k+1 in each row (0 for empty slots)."""
  ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  return jnp.sum(segment_ids[:, :, None] == ids, axis=1).astype(jnp.int32)


def timestep_shift(token_counts, config):
  """The resolution shift s per sequence: s = clip(sqrt(n / n_base), 1, s_max).

  SD3 (Esser et al. 2024, sec. 5.3.2) shifts by sqrt(m / n) for m pixels against a
  base of n; Open-Sora 2.0 shifts by the token count of the clip. More tokens carry
  more redundant signal, so the same t destroys less information: the shift moves
  training and sampling towards higher noise. n_base = config.flow.shift_base_tokens,
  s_max = config.flow.shift_max. Never below 1: short sequences (images) keep the
  plain logit-normal rather than training mostly at low noise.
  """
  shift_max = float(config.flow.shift_max)
  if shift_max < 1.0 or config.flow.shift_base_tokens <= 0:
    raise UsageError(
        f"flow.shift_max must be >= 1 (got {shift_max}) and flow.shift_base_tokens > 0 "
        f"(got {config.flow.shift_base_tokens})"
    )
  ratio = jnp.asarray(token_counts, jnp.float32) / float(config.flow.shift_base_tokens)
  return jnp.clip(jnp.sqrt(ratio), 1.0, shift_max)


def shift_time(t, shift):
  """t' = s t / (1 + (s - 1) t): monotone on [0, 1], keeps 0 and 1, s > 1 raises t."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_time(t_shifted, shift):
  """The inverse of `shift_time`: t = t' / (s - (s - 1) t')."""
  return t_shifted / (shift - (shift - 1.0) * t_shifted)


def sample_timesteps(rng, segment_token_counts, config):
  """float32 [R, K] diffusion times, one per segment.

  t = sigmoid(u), u ~ N(flow.logit_normal_mean, flow.logit_normal_std^2) (SD3's
  logit-normal), then t' = s t / (1 + (s - 1) t) with s from `timestep_shift` of the
  segment's token count.
  """
  u = config.flow.logit_normal_mean + config.flow.logit_normal_std * jax.random.normal(
      rng, segment_token_counts.shape, jnp.float32
  )
  return shift_time(jax.nn.sigmoid(u), timestep_shift(segment_token_counts, config))


# ------------------------------------------------------------------ conditioning frames

# Pattern ids, in the order of their probabilities in `_pattern_probabilities`.
NONE, FIRST, LAST, PREFIX, SUFFIX, BOTH_ENDS = range(6)


def _pattern_probabilities(config):
  f = config.flow
  probs = [f.cond_first_frame, f.cond_last_frame, f.cond_prefix, f.cond_suffix, f.cond_both_ends]
  if any(p < 0 for p in probs) or sum(probs) > 1.0 + 1e-6:
    raise UsageError(
        "flow.cond_first_frame, cond_last_frame, cond_prefix, cond_suffix, cond_both_ends must be "
        f">= 0 and sum to at most 1; got {probs} (sum {sum(probs):.3f})"
    )
  return jnp.asarray([max(0.0, 1.0 - sum(probs))] + list(probs), jnp.float32)


def conditioning_frames(rng, segment_frames, config):
  """Clean prefix and suffix lengths per segment, int32 ([R, K], [R, K]), in patch frames.

  Each video segment (frames > 1) independently gets one pattern with the flow.cond_*
  probabilities (else none): first frame (prefix 1), last frame (suffix 1), a prefix
  or a suffix of length uniform in 1..frames-1, or both ends (a prefix and a suffix
  each uniform in 1..(frames-1)//2, so at least one frame stays noisy; with 2 frames
  it falls back to the first frame). Images (1 frame) and empty slots: never.
  """
  k_pattern, k_prefix, k_suffix = jax.random.split(rng, 3)
  frames = segment_frames.astype(jnp.int32)
  pattern = jax.random.categorical(k_pattern, jnp.log(_pattern_probabilities(config)), shape=frames.shape)
  pattern = jnp.where(frames > 1, pattern, NONE)

  def uniform_1_to(high, key):  # Uniform integer in 1..high (high >= 1).
    u = jax.random.uniform(key, frames.shape)
    return 1 + jnp.floor(u * jnp.maximum(high, 1)).astype(jnp.int32)

  span = uniform_1_to(frames - 1, k_prefix), uniform_1_to(frames - 1, k_suffix)
  half = uniform_1_to((frames - 1) // 2, k_prefix), uniform_1_to((frames - 1) // 2, k_suffix)
  both_ok = frames >= 3
  prefix = jnp.select(
      [pattern == FIRST, pattern == PREFIX, (pattern == BOTH_ENDS) & both_ok, pattern == BOTH_ENDS],
      [1, span[0], half[0], 1],
      0,
  )
  suffix = jnp.select([pattern == LAST, pattern == SUFFIX, (pattern == BOTH_ENDS) & both_ok], [1, span[1], half[1]], 0)
  return prefix.astype(jnp.int32), suffix.astype(jnp.int32)


def per_token(segment_values, segment_ids):
  """[R, K] per-segment values -> [R, L] per token (padding tokens read slot 0; mask them)."""
  slot = jnp.maximum(segment_ids - 1, 0)
  return jnp.take_along_axis(segment_values, slot, axis=1)


def clean_mask(rng, positions, segment_ids, segment_frames, config):
  """bool [R, L]: tokens given clean (time 0, no loss) by the drawn conditioning patterns."""
  prefix, suffix = conditioning_frames(rng, segment_frames, config)
  t_index = positions[..., 0]
  frames = per_token(segment_frames, segment_ids)
  clean = (t_index < per_token(prefix, segment_ids)) | (t_index >= frames - per_token(suffix, segment_ids))
  return clean & (segment_ids > 0)


# ------------------------------------------------------------------ training inputs and loss


def noise_tokens(x0, eps, t):
  """x_t = (1 - t) x0 + t eps, with t broadcast over the feature axis ([R, L] or scalar).

  Where t == 0 the result is x0 bit for bit (selected, not computed), so clean
  conditioning tokens are exact whatever the compiler does with the arithmetic.
  """
  t = jnp.asarray(t, x0.dtype)
  t = t[..., None] if t.ndim == x0.ndim - 1 else t
  return jnp.where(t == 0, x0, (1 - t) * x0 + t * eps)


def flow_training_inputs(rng, batch, config):
  """Everything random in a train step, from one rng and a packed batch.

  Returns dict: x_t [R, L, P], t [R, L] (0 on clean and padding tokens), v_target
  (eps - x0), loss_mask bool [R, L] (real, noisy tokens), clean bool [R, L], and
  drop_text bool [R, K] (caption dropout with probability config.text.dropout).
  """
  x0 = batch["tokens"]
  segment_ids = batch["segment_ids"]
  num_segments = batch["segment_frames"].shape[1]
  k_time, k_cond, k_noise, k_drop = jax.random.split(rng, 4)
  t_segment = sample_timesteps(k_time, segment_token_counts(segment_ids, num_segments), config)
  clean = clean_mask(k_cond, batch["positions"], segment_ids, batch["segment_frames"], config)
  real = segment_ids > 0
  t = jnp.where(real & ~clean, per_token(t_segment, segment_ids), 0.0)
  eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
  return dict(
      x_t=noise_tokens(x0, eps, t),
      t=t,
      v_target=eps - x0,
      loss_mask=real & ~clean,
      clean=clean,
      drop_text=jax.random.bernoulli(k_drop, config.text.dropout, t_segment.shape),
  )


def _range_name(lo, hi):
  return f"loss_t{int(round(lo * 100)):02d}_{int(round(hi * 100)):02d}"


def flow_loss(v_pred, v_target, loss_mask, t):
  """Mean squared velocity error over loss tokens, and metrics.

  Each loss token weighs the same (so a long clip counts more than a small image,
  as in NaViT). Metrics: loss, loss_tokens, and per timestep range `loss_tLO_HI`
  with its token count `tokens_tLO_HI` (the range loss is 0 when it has no tokens,
  and the stage loop then leaves it out of the logged row; weight by the count when
  averaging over steps).
  """
  per_token_mse = jnp.mean(jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32)), axis=-1)
  weight = loss_mask.astype(jnp.float32)
  count = jnp.sum(weight)
  loss = jnp.sum(per_token_mse * weight) / jnp.maximum(count, 1.0)
  metrics = {"loss": loss, "loss_tokens": count}
  edges = LOSS_T_EDGES
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    upper = (t <= hi) if i == len(edges) - 2 else (t < hi)
    in_range = weight * ((t >= lo) & upper)
    n = jnp.sum(in_range)
    name = _range_name(lo, hi)
    metrics[name] = jnp.sum(per_token_mse * in_range) / jnp.maximum(n, 1.0)
    metrics[name.replace("loss_", "tokens_")] = n
  return loss, metrics


# ------------------------------------------------------------------ sampling


def sample_time_grid(steps: int, token_count, config, start_t: float = 1.0):
  """float32 [..., steps + 1]: times from start_t down to exactly 0, shifted like training.

  A uniform grid in unshifted time, mapped through `shift_time` with the shift of
  `token_count` (a scalar, or an array, e.g. [R] per row, giving one grid per
  entry). For SDEdit-style editing, start_t < 1 begins at that (shifted) time: pass
  x_T = noise_tokens(x_source, eps, start_t) to `sample_ode`.
  """
  if steps < 1 or not 0.0 < start_t <= 1.0:
    raise UsageError(f"sampling needs steps >= 1 (got {steps}) and 0 < start_t <= 1 (got {start_t})")
  shift = timestep_shift(token_count, config)[..., None]  # [..., 1]: one grid per count.
  u_start = unshift_time(jnp.float32(start_t), shift)
  u = u_start * jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
  grid = shift_time(u, shift)
  grid = grid.at[..., 0].set(start_t)  # Exact endpoints despite float rounding.
  return grid.at[..., -1].set(0.0)


def _time_at(t_grid, i, token_shape):
  """The grid's i-th time broadcast to per-token [R, L]."""
  t = jax.lax.dynamic_index_in_dim(t_grid, i, axis=t_grid.ndim - 1, keepdims=False)
  t = t.reshape(t.shape + (1,) * (len(token_shape) - t.ndim))
  return jnp.broadcast_to(t, token_shape)


def sample_ode(velocity_fn, x_T, t_grid, clean_mask=None, x_clean=None, sampler: str = "euler"):
  """Integrates dx/dt = v from t_grid[0] (noise) to t_grid[-1] = 0, in one lax.fori_loop.

  velocity_fn(x [R, L, P], t [R, L]) -> v (an NNX model is merged inside it: modules
  must live at the trace level they run in).
  t_grid: [N + 1] shared, or [R, N + 1] per row, or [R, L, N + 1] per token; an int
  N means a plain linear grid 1 -> 0 (use `sample_time_grid` for the training
  shift). Tokens in clean_mask [R, L] are held at x_clean exactly, and the model
  sees them at t = 0 at every evaluation.
  Euler: x += dt v(x, t). Heun: the trapezoid of v at both ends of the step.
  """
  if sampler not in SAMPLERS:
    raise UsageError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  if isinstance(t_grid, int):
    t_grid = jnp.linspace(1.0, 0.0, t_grid + 1, dtype=jnp.float32)
  t_grid = jnp.asarray(t_grid, jnp.float32)
  token_shape = x_T.shape[:-1]
  if clean_mask is None:
    clean_mask = jnp.zeros(token_shape, bool)
    x_clean = jnp.zeros_like(x_T)
  keep = clean_mask[..., None]

  def hold(x):
    return jnp.where(keep, x_clean, x)

  def step(i, x):
    def velocity(x, t):
      return velocity_fn(hold(x), jnp.where(clean_mask, 0.0, t))

    t_now, t_next = _time_at(t_grid, i, token_shape), _time_at(t_grid, i + 1, token_shape)
    dt = (t_next - t_now)[..., None]
    v = velocity(x, t_now)
    x_euler = x + dt * v
    if sampler == "heun":
      x_euler = x + dt * 0.5 * (v + velocity(x_euler, t_next))
    return hold(x_euler)

  return jax.lax.fori_loop(0, t_grid.shape[-1] - 1, step, hold(x_T))


def cfg_velocity(model_fn, guidance: float, row_inputs=None, num_segments: int = 1):
  """A velocity_fn for classifier-free guidance, both branches in ONE forward pass.

  The rows are doubled (conditional first, then unconditional) and
  model_fn(x [2R, L, P], t [2R, L], drop_text bool [2R, K], [row_inputs]) is called
  once, K = num_segments (all of a row's segments share the branch). row_inputs (an
  optional pytree with a leading row axis, e.g. positions, segment ids and text) is
  tiled to 2R rows. Returns v = v_u + g (v_c - v_u); guidance 1 (a Python float)
  runs the conditional branch only.
  """
  tiled = () if row_inputs is None else (row_inputs,)

  def velocity_fn(x, t):
    rows = x.shape[0]
    if guidance == 1.0:
      return model_fn(x, t, jnp.zeros((rows, num_segments), bool), *tiled)
    doubled = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), (x, t) + tiled)
    drop = jnp.repeat(jnp.asarray([False, True]), rows)[:, None] & jnp.ones((1, num_segments), bool)
    v = model_fn(doubled[0], doubled[1], drop, *doubled[2:])
    v_cond, v_uncond = v[:rows], v[rows:]
    return v_uncond + guidance * (v_cond - v_uncond)

  return velocity_fn
