"""Rectified flow: noising, timesteps, conditioning frames, loss and the ODE samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidsim import flow
from vidsim.errors import UsageError

P = 4  # Features per token.


def _segment(frames, h, w):
  t, hh, ww = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([t, hh, ww], -1).reshape(-1, 3)


def packed_batch(seed=0):
  """Two rows of 16 tokens: [video 3x2x2, image 1x2x2] and [image 1x2x2, video 2x2x2, 4 padding]."""
  rows = [[(3, 2, 2), (1, 2, 2)], [(1, 2, 2), (2, 2, 2)]]
  length, slots = 16, 3
  positions = np.zeros((2, length, 3), np.int32)
  segment_ids = np.zeros((2, length), np.int32)
  segment_frames = np.zeros((2, slots), np.int32)
  for r, segments in enumerate(rows):
    start = 0
    for k, shape in enumerate(segments):
      pos = _segment(*shape)
      positions[r, start : start + len(pos)] = pos
      segment_ids[r, start : start + len(pos)] = k + 1
      segment_frames[r, k] = shape[0]
      start += len(pos)
  tokens = np.random.default_rng(seed).normal(size=(2, length, P)).astype(np.float32)
  tokens[segment_ids == 0] = 0
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, segment_frames=segment_frames)


def set_cond(config, **probs):
  for name in ("cond_first_frame", "cond_last_frame", "cond_prefix", "cond_suffix", "cond_both_ends"):
    config.flow[name] = probs.get(name, 0.0)
  return config


# ------------------------------------------------------------------ noising and training inputs


def test_noise_endpoints_are_exact():
  x0, eps = jax.random.normal(jax.random.key(0), (2, 2, 5, P))
  np.testing.assert_array_equal(flow.noise_tokens(x0, eps, jnp.zeros((2, 5))), x0)
  np.testing.assert_array_equal(flow.noise_tokens(x0, eps, jnp.ones((2, 5))), eps)
  np.testing.assert_allclose(flow.noise_tokens(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, rtol=1e-6)


def test_training_inputs_clean_tokens_exact_and_without_loss(tiny_config):
  config = set_cond(tiny_config, cond_prefix=0.5, cond_both_ends=0.5)
  batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
  inputs = jax.jit(lambda rng, b: flow.flow_training_inputs(rng, b, config))(jax.random.key(3), batch)
  clean, mask, t = map(np.asarray, (inputs["clean"], inputs["loss_mask"], inputs["t"]))
  real = np.asarray(batch["segment_ids"]) > 0
  assert clean.any() and (real & ~clean).any()
  x0 = np.asarray(batch["tokens"])
  np.testing.assert_array_equal(np.asarray(inputs["x_t"])[clean], x0[clean])
  assert not mask[clean].any() and not mask[~real].any() and mask[real & ~clean].all()
  assert (t[clean] == 0).all() and (t[~real] == 0).all() and (t[mask] > 0).all()
  # v = eps - x0 and x_t = x0 + t v on noisy tokens.
  expected = x0 + t[..., None] * np.asarray(inputs["v_target"])
  np.testing.assert_allclose(np.asarray(inputs["x_t"])[mask], expected[mask], atol=1e-5)
  # One time per segment.
  ids = np.asarray(batch["segment_ids"])
  for r in range(2):
    for k in (1, 2):
      times = t[r][(ids[r] == k) & mask[r]]
      assert len(set(times.tolist())) <= 1
  assert inputs["drop_text"].shape == (2, 3) and inputs["drop_text"].dtype == bool


def test_same_rng_same_inputs_and_different_rng_differs(tiny_config):
  batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
  make = jax.jit(lambda rng: flow.flow_training_inputs(rng, batch, tiny_config))
  a, b, c = make(jax.random.key(1)), make(jax.random.key(1)), make(jax.random.key(2))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["x_t"], c["x_t"])


def test_caption_dropout_rate(tiny_config):
  tiny_config.text.dropout = 0.3
  batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
  drop_text = jax.jit(jax.vmap(lambda rng: flow.flow_training_inputs(rng, batch, tiny_config)["drop_text"]))
  drops = drop_text(jax.random.split(jax.random.key(0), 2000))
  assert abs(float(drops.mean()) - 0.3) < 0.02


# ------------------------------------------------------------------ timesteps


def test_timestep_moments_at_base_length(tiny_config):
  tiny_config.flow.logit_normal_mean = 0.5
  tiny_config.flow.logit_normal_std = 0.8
  counts = jnp.full((200, 50), tiny_config.flow.shift_base_tokens)
  t = np.asarray(flow.sample_timesteps(jax.random.key(0), counts, tiny_config))
  assert ((t > 0) & (t < 1)).all()
  logits = np.log(t / (1 - t))
  assert abs(logits.mean() - 0.5) < 0.02 and abs(logits.std() - 0.8) < 0.02


def test_longer_sequences_get_larger_times(tiny_config):
  base = tiny_config.flow.shift_base_tokens
  means = []
  for count in (base // 4, base, base * 4, base * 400):
    t = flow.sample_timesteps(jax.random.key(0), jnp.full((100, 100), count), tiny_config)
    means.append(float(t.mean()))
  assert means[0] == means[1] < means[2] < means[3]  # No shift below the base length.
  assert abs(means[1] - 0.5) < 0.01
  # Capped: the shift never exceeds flow.shift_max.
  s = float(flow.timestep_shift(base * 400, tiny_config))
  assert s == pytest.approx(tiny_config.flow.shift_max)
  assert float(flow.timestep_shift(base * 4, tiny_config)) == pytest.approx(2.0)
  assert float(flow.shift_time(0.5, 2.0)) == pytest.approx(2 / 3)
  assert float(flow.unshift_time(flow.shift_time(0.3, 2.5), 2.5)) == pytest.approx(0.3)


# ------------------------------------------------------------------ conditioning frames


def _clean(config, seed, batch=None):
  batch = batch or packed_batch()
  return np.asarray(
      flow.clean_mask(
          jax.random.key(seed), batch["positions"], batch["segment_ids"], batch["segment_frames"], config
      )
  )


def test_first_frame_conditions_only_frame_zero_of_videos(tiny_config):
  config = set_cond(tiny_config, cond_first_frame=1.0)
  batch = packed_batch()
  ids, frame = batch["segment_ids"], batch["positions"][..., 0]
  video = np.take_along_axis(batch["segment_frames"], np.maximum(ids - 1, 0), 1) > 1
  expected = (ids > 0) & video & (frame == 0)
  for seed in range(5):
    np.testing.assert_array_equal(_clean(config, seed), expected)


def test_patterns_never_touch_images_and_keep_a_noisy_frame(tiny_config):
  batch = packed_batch()
  ids, frame = batch["segment_ids"], batch["positions"][..., 0]
  frames_per_token = np.take_along_axis(batch["segment_frames"], np.maximum(ids - 1, 0), 1)
  for pattern in ("cond_last_frame", "cond_prefix", "cond_suffix", "cond_both_ends"):
    config = set_cond(tiny_config, **{pattern: 1.0})
    for seed in range(20):
      clean = _clean(config, seed)
      assert not clean[(frames_per_token == 1) | (ids == 0)].any(), pattern
      for r in range(2):
        for k in np.unique(ids[r][frames_per_token[r] > 1]):
          seg = ids[r] == k
          clean_frames = set(frame[r][seg & clean[r]].tolist())
          all_frames = set(frame[r][seg].tolist())
          assert clean_frames and clean_frames != all_frames, (pattern, clean_frames)
          # Whole frames: every token of a clean frame is clean.
          assert all(clean[r][seg & (frame[r] == f)].all() for f in clean_frames)
          last = max(all_frames)
          if pattern == "cond_last_frame":
            assert clean_frames == {last}
          if pattern == "cond_prefix":
            assert clean_frames == set(range(len(clean_frames)))
          if pattern == "cond_suffix":
            assert clean_frames == set(range(last - len(clean_frames) + 1, last + 1))
          if pattern == "cond_both_ends":
            assert 0 in clean_frames and (last in clean_frames or last == 1)


def test_pattern_probabilities(tiny_config):
  config = set_cond(tiny_config, cond_first_frame=0.3, cond_last_frame=0.2)
  frames = jnp.full((400, 50), 4)
  prefix, suffix = flow.conditioning_frames(jax.random.key(0), frames, config)
  assert abs(float((prefix == 1).mean()) - 0.3) < 0.01
  assert abs(float((suffix == 1).mean()) - 0.2) < 0.01
  with pytest.raises(UsageError, match="sum to at most 1"):
    flow.conditioning_frames(jax.random.key(0), frames, set_cond(config, cond_prefix=0.6, cond_suffix=0.6))


# ------------------------------------------------------------------ loss


def test_loss_masks_and_timestep_ranges():
  v_target = jnp.zeros((1, 6, 2))
  v_pred = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])[None, :, None] * jnp.ones((1, 6, 2))
  t = jnp.asarray([[0.1, 0.3, 0.3, 0.6, 1.0, 0.5]])
  mask = jnp.asarray([[True, True, True, True, True, False]])
  loss, metrics = jax.jit(flow.flow_loss)(v_pred, v_target, mask, t)
  assert float(loss) == pytest.approx((1 + 4 + 9 + 16 + 25) / 5)
  assert float(metrics["loss_t00_25"]) == pytest.approx(1.0)
  assert float(metrics["loss_t25_50"]) == pytest.approx((4 + 9) / 2)
  assert float(metrics["loss_t50_75"]) == pytest.approx(16.0)
  assert float(metrics["loss_t75_100"]) == pytest.approx(25.0)
  assert [float(metrics[f"tokens_t{r}"]) for r in ("00_25", "25_50", "50_75", "75_100")] == [1, 2, 1, 1]


# ------------------------------------------------------------------ samplers


def test_euler_follows_a_straight_line_exactly(tiny_config):
  x0, eps = jax.random.normal(jax.random.key(0), (2, 3, 8, P))
  grid = flow.sample_time_grid(7, 1000, tiny_config)  # Shifted, uneven steps.
  out = flow.sample_ode(lambda x, t: eps - x0, eps, grid)
  np.testing.assert_allclose(out, x0, atol=1e-5)
  # SDEdit: start from the source noised to start_t.
  grid = flow.sample_time_grid(5, 64, tiny_config, start_t=0.4)
  assert float(grid[0]) == pytest.approx(0.4) and float(grid[-1]) == 0.0
  out = flow.sample_ode(lambda x, t: eps - x0, flow.noise_tokens(x0, eps, 0.4), grid)
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_heun_beats_euler_on_a_curved_field():
  x1 = jax.random.normal(jax.random.key(0), (1, 4, P))
  exact = x1 * np.exp(-1.0)  # dx/dt = x, integrated from t=1 to t=0.
  errors = {s: float(jnp.abs(flow.sample_ode(lambda x, t: x, x1, 10, sampler=s) - exact).max()) for s in flow.SAMPLERS}
  assert errors["heun"] < errors["euler"] / 10


def test_time_grid_monotone_and_shifted_by_length(tiny_config):
  base = tiny_config.flow.shift_base_tokens
  grids = np.asarray(flow.sample_time_grid(8, jnp.asarray([base, 4 * base, 8 * base]), tiny_config))
  assert grids.shape == (3, 9)
  assert (grids[:, 0] == 1).all() and (grids[:, -1] == 0).all() and (np.diff(grids, axis=1) < 0).all()
  assert (grids[0, 1:-1] < grids[1, 1:-1]).all() and (grids[1, 1:-1] < grids[2, 1:-1]).all()


def _mixing_velocity(x, t):
  """A field that mixes tokens, so noisy tokens depend on what the model sees at clean ones."""
  return jnp.tanh(x.mean(axis=1, keepdims=True) + x) * (1 + t[..., None]) + t[..., None] ** 2


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_clean_tokens_held_exactly_and_seen_at_time_zero(sampler, tiny_config):
  key_noise, key_clean = jax.random.split(jax.random.key(0))
  x_T = jax.random.normal(key_noise, (2, 6, P))
  x_clean = jax.random.normal(key_clean, (2, 6, P))
  clean = jnp.asarray([[True, True, False, False, False, False], [False] * 5 + [True]])
  grid = flow.sample_time_grid(5, 12, tiny_config)
  run = jax.jit(lambda x: flow.sample_ode(_mixing_velocity, x, grid, clean, x_clean, sampler))
  out = np.asarray(run(x_T))
  np.testing.assert_array_equal(out[np.asarray(clean)], np.asarray(x_clean)[np.asarray(clean)])
  np.testing.assert_array_equal(out, np.asarray(run(x_T)))  # Same input, same output.

  # Reference: a plain Python loop with the same semantics.
  keep = clean[..., None]
  x = jnp.where(keep, x_clean, x_T)
  for i in range(len(grid) - 1):
    t_now, t_next = jnp.where(clean, 0.0, grid[i]), jnp.where(clean, 0.0, grid[i + 1])
    dt = grid[i + 1] - grid[i]
    v = _mixing_velocity(x, t_now)
    if sampler == "heun":
      x_e = jnp.where(keep, x_clean, x + dt * v)
      v = 0.5 * (v + _mixing_velocity(x_e, t_next))
    x = jnp.where(keep, x_clean, x + dt * v)
  np.testing.assert_allclose(out, np.asarray(x), atol=1e-5)


def test_unknown_sampler_is_a_usage_error():
  with pytest.raises(UsageError, match="euler, heun"):
    flow.sample_ode(lambda x, t: x, jnp.zeros((1, 2, 3)), 4, sampler="rk4")


def test_cfg_batches_both_branches_in_one_call():
  calls = []

  def model_fn(x, t, drop_text, row_inputs):
    calls.append(x.shape[0])
    assert row_inputs["ids"].shape[0] == x.shape[0]
    assert drop_text.shape == (x.shape[0], 2)
    return x * jnp.where(drop_text[:, :1], 1.0, 3.0)[..., None]  # v_u = x, v_c = 3x.

  x = jax.random.normal(jax.random.key(0), (3, 5, P))
  v = flow.cfg_velocity(model_fn, 2.0, row_inputs={"ids": jnp.zeros((3, 5))}, num_segments=2)(x, jnp.zeros((3, 5)))
  np.testing.assert_allclose(v, 5 * x, rtol=1e-6)  # x + 2 (3x - x).
  assert calls == [6]
  v = flow.cfg_velocity(model_fn, 1.0, row_inputs={"ids": jnp.zeros((3, 5))}, num_segments=2)(x, jnp.zeros((3, 5)))
  np.testing.assert_allclose(v, 3 * x, rtol=1e-6)
  assert calls == [6, 3]


def test_packed_batches_of_any_mix_run_on_the_mesh_with_one_compile(tiny_config):
  """The packer's output feeds the flow objective as global arrays on an 8-device mesh."""
  import grain

  from vidsim import mesh as mesh_lib
  from vidsim.data import packing

  rng = np.random.default_rng(0)
  shapes = [(2, 4, 4, 4), (1, 4, 4, 4), (3, 4, 6, 4), (1, 2, 8, 4), (6, 4, 4, 4)]
  examples = []
  for i in range(300):
    text = np.zeros(tiny_config.text.max_length, np.int32)
    text[:3] = i % 200 + 1
    latent = rng.normal(size=shapes[rng.integers(len(shapes))]).astype(np.float32)
    examples.append(dict(latent=latent, text_tokens=text))
  mesh = mesh_lib.make_mesh(tiny_config)

  @jax.jit
  def loss_of_zero_model(batch, rng):
    inputs = flow.flow_training_inputs(rng, batch, tiny_config)
    return flow.flow_loss(jnp.zeros_like(inputs["v_target"]), inputs["v_target"], inputs["loss_mask"], inputs["t"])

  with mesh_lib.activate(mesh, tiny_config):
    for step, host_batch in enumerate(packing.packed_dataset(grain.MapDataset.source(examples), tiny_config)):
      batch = mesh_lib.make_global_batch(host_batch, mesh, tiny_config)
      loss, metrics = loss_of_zero_model(batch, jax.random.key(step))
      # A zero velocity misses |eps - x0|^2: about 2 per feature for unit-variance x0.
      assert 1.0 < float(loss) < 3.0 and float(metrics["loss_tokens"]) > 0
  assert step >= 2 and loss_of_zero_model._cache_size() == 1
