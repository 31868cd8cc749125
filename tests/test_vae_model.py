"""The causal video VAE: shapes, causality, tiling, bad input, sharding names, learning, FLOPs."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim import quality
from vidsim.errors import UsageError
from vidsim.models import vae as vae_lib
from vidsim.models import vae_tiling


def _config(tiny_config, **vae):
  c = tiny_config
  with c.unlocked():
    for key, value in vae.items():
      c.vae[key] = value
  return c


def _video(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model_and_config():
  # One model for the file: building (and compiling the init of) every shape is the slow part.
  c = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "experiments" / "digits_tiny.py"))
  c = _config(c, widths=(8, 16, 16))
  return vae_lib.VideoVAE(c.vae, rngs=nnx.Rngs(0)), c


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("height,width", [(16, 16), (20, 48), (28, 16)])  # square, 2.4:1, 9:16-like
def test_latent_shapes_match_the_model(model_and_config, frames, height, width):
  model, c = model_and_config
  graphdef, state = nnx.split(model)
  video = jax.ShapeDtypeStruct((2, frames, height, width, 3), jnp.float32)
  mean, logvar = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).encode(v), state, video)
  expected = vae_lib.latent_shape(c, frames, height, width)
  assert expected == (1 + (frames - 1) // 4, height // 4, width // 4, 4)
  assert mean.shape == logvar.shape == (2, *expected)
  recon = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, mean)
  assert recon.shape == (2, frames, height, width, 3)
  assert vae_lib.pixel_shape(c, *expected[:3]) == (frames, height, width)


@pytest.mark.parametrize("ct,cs,widths", [(1, 4, (8, 8, 8)), (2, 8, (8, 8, 8, 8)), (4, 16, (4, 4, 8, 8, 8))])
def test_every_compression_builds(tiny_config, ct, cs, widths):
  c = _config(tiny_config, temporal_compression=ct, spatial_compression=cs, widths=widths)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae_lib.VideoVAE(c.vae, rngs=nnx.Rngs(0))))
  frames = 1 + 2 * ct
  video = jax.ShapeDtypeStruct((1, frames, cs, 2 * cs, 3), jnp.float32)
  recon, mean, _ = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, jax.random.key(0)), state, video)
  assert mean.shape == (1, 3, 1, 2, 4)
  assert recon.shape == (1, frames, cs, 2 * cs, 3)


# ------------------------------------------------------------------ causality


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_encoder_is_causal(tiny_config, padding):
  c = _config(tiny_config, widths=(8, 16, 16), causal_padding=padding)
  model = vae_lib.VideoVAE(c.vae, rngs=nnx.Rngs(0))
  video = _video((1, 9, 16, 16, 3))
  base, _ = model.encode(video)
  for frame in (1, 4, 5, 8):
    changed, _ = model.encode(video.at[:, frame].set(_video((1, 16, 16, 3), seed=frame + 1)))
    first_affected = -(-frame // 4)  # ceil(frame / ct): frame 0 alone, then groups of ct.
    np.testing.assert_array_equal(changed[:, :first_affected], base[:, :first_affected])
    assert jnp.abs(changed[:, first_affected] - base[:, first_affected]).max() > 1e-4


def test_decoder_is_causal(model_and_config):
  model, _ = model_and_config
  z = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 4))
  base = model.decode(z)
  for latent in (1, 2):
    changed = model.decode(z.at[:, latent].add(1.0))
    first_affected = 1 + (latent - 1) * 4
    np.testing.assert_array_equal(changed[:, :first_affected], base[:, :first_affected])
    assert jnp.abs(changed[:, first_affected] - base[:, first_affected]).max() > 1e-4


# ------------------------------------------------------------------ tiling


def test_temporal_chunks_are_exact(model_and_config):
  model, _ = model_and_config
  video = _video((1, 9, 16, 16, 3))
  mean, logvar = model.encode(video)
  # tile_frames=4 (one latent frame per chunk): frame 0 alone, then two chunks of 4.
  t_mean, t_logvar = vae_tiling.tiled_encode(model, video, tile_frames=4, tile_size=0, overlap=0)
  np.testing.assert_allclose(t_mean, mean, atol=1e-4 * float(jnp.abs(mean).max()))
  np.testing.assert_allclose(t_logvar, logvar, atol=1e-4 * float(jnp.abs(logvar).max()))
  recon = model.decode(mean)
  t_recon = vae_tiling.tiled_decode(model, mean, tile_frames=4, tile_size=0, overlap=0)
  np.testing.assert_allclose(t_recon, recon, atol=1e-4 * float(jnp.abs(recon).max()))


def _relative_rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.square(a - b))) / jnp.sqrt(jnp.mean(jnp.square(b))))


@pytest.mark.slow  # ~15-25 s: compiles the model for several tile shapes.
def test_spatial_tiles_are_within_the_stated_tolerance(model_and_config):
  """Per-frame norms make spatial tiles approximate (vae_tiling's docstring states the
  figures); a full halo and an overlap bring them close, and each helps."""
  model, c = model_and_config
  # A smooth image (white noise would exaggerate edge effects); 96 px = 24 latents.
  video = jax.image.resize(_video((1, 1, 12, 12, 3)), (1, 1, 96, 96, 3), "linear")
  mean, _ = model.encode(video)
  recon = model.decode(mean)
  halo = vae_lib.receptive_radius(c)
  assert halo % 4 == 0 and 24 <= halo <= 48
  errors = {}
  for tile, overlap, pad in ((48, 0, halo), (48, 16, halo), (32, 16, 16), (32, 0, 0)):
    t_mean, _ = vae_tiling.tiled_encode(model, video, tile_frames=0, tile_size=tile, overlap=overlap, halo=pad)
    t_recon = vae_tiling.tiled_decode(model, mean, tile_frames=0, tile_size=tile, overlap=overlap, halo=pad)
    assert t_mean.shape == mean.shape and t_recon.shape == recon.shape
    errors[tile, overlap, pad] = (_relative_rms(t_mean, mean), _relative_rms(t_recon, recon))
  for i in range(2):  # encode, decode
    assert errors[48, 0, halo][i] < 0.15 and errors[48, 16, halo][i] < 0.15
    assert errors[48, 16, halo][i] < errors[32, 16, 16][i] < errors[32, 0, 0][i]


def test_tiling_rejects_unaligned_tiles(model_and_config):
  model, _ = model_and_config
  with pytest.raises(UsageError, match="must be multiples of the spatial compression 4"):
    vae_tiling.tiled_encode(model, _video((1, 5, 16, 16, 3)), tile_frames=4, tile_size=10, overlap=4)
  with pytest.raises(UsageError, match="smaller than tile_size"):
    vae_tiling.tiled_decode(model, jnp.zeros((1, 2, 4, 4, 4)), tile_frames=4, tile_size=8, overlap=8)


# ------------------------------------------------------------------ bad input


def test_bad_shapes_name_the_dimension_and_nearest_sizes(tiny_config):
  c = tiny_config  # ct = 4, cs = 4
  with pytest.raises(UsageError, match=r"frames=7 is not 1 \+ k\*4 \(nearest valid: \[5, 9\]\)"):
    vae_lib.check_video_shape(c, 7, 16, 16)
  with pytest.raises(UsageError, match=r"height=18 is not a multiple of 4 \(nearest valid: \[16, 20\]\)"):
    vae_lib.latent_shape(c, 5, 18, 16)
  with pytest.raises(UsageError, match=r"width=2 .*nearest valid: \[4\]"):
    vae_lib.check_video_shape(c, 1, 16, 2)
  with pytest.raises(UsageError, match=r"frames=0 .*nearest valid: \[1\]"):
    vae_lib.check_video_shape(c, 0, 16, 16)
  vae_lib.check_video_shape(c, 1, 4, 4)  # An image is valid.


def test_model_rejects_unaligned_video_and_bad_config(model_and_config, tiny_config):
  model, _ = model_and_config
  with pytest.raises(UsageError, match="frames must be 1 \\+ k\\*4"):
    model.encode(jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(UsageError, match="widths"):
    vae_lib.VideoVAE(_config(tiny_config, widths=(8, 16)).vae, rngs=nnx.Rngs(0))
  with pytest.raises(UsageError, match="temporal_compression=3"):
    vae_lib.VideoVAE(_config(tiny_config, temporal_compression=3).vae, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ sharding names


def test_params_carry_logical_partition_names(model_and_config):
  model, _ = model_and_config
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat = nnx.to_flat_state(specs)
  assert len(flat) > 20
  for path, leaf in flat:
    spec, name = leaf.get_value(), path[-1]  # A PartitionSpec, not an array.
    assert isinstance(spec, P), (path, spec)
    if name == "kernel":
      assert spec[:4] == (None, None, None, "conv_in"), path
      assert spec[4] == ("conv_out" if path[:2] != ("decoder", "conv_out") else None), path
    elif name == "bias":
      assert len(spec) == 1, path
    else:
      assert name == "scale" and spec == P("norm"), path


def test_params_are_sharded_under_a_mesh(tiny_config):
  c = _config(tiny_config, widths=(8, 16, 16))
  with c.unlocked():
    c.mesh.ici.data, c.mesh.ici.fsdp = 4, 2
  mesh = mesh_lib.make_mesh(c)
  with mesh_lib.activate(mesh, c):
    abstract = nnx.eval_shape(lambda: vae_lib.VideoVAE(c.vae, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert params["encoder"]["conv_in"]["kernel"].get_value().sharding.spec == P(None, None, None, None, "fsdp")
  shardings = mesh_lib.param_shardings(params, mesh, c)
  assert shardings["encoder"]["downs"][0]["kernel"].spec == P(None, None, None, None, "fsdp")
  replicated = lambda sharding: all(axis is None for axis in sharding.spec)
  assert replicated(shardings["decoder"]["conv_out"]["kernel"])  # 3 RGB channels do not split.
  assert replicated(shardings["decoder"]["norm_out"]["scale"])


# ------------------------------------------------------------------ loss and learning


def test_vae_loss_metrics(model_and_config, tiny_config):
  model, _ = model_and_config
  c = tiny_config  # Only its vae_train loss keys are read; changed below.
  video = _video((2, 5, 16, 16, 3))
  loss, metrics = vae_lib.vae_loss(model, video, jax.random.key(0), c)
  assert set(metrics) == {"recon", "kl", "psnr", "loss"}
  assert float(loss) == pytest.approx(float(metrics["recon"] + c.vae_train.kl_weight * metrics["kl"]), rel=1e-6)
  with c.unlocked():
    c.vae_train.recon_loss, c.vae_train.frame_diff_weight = "l2", 0.5
  loss2, metrics2 = vae_lib.vae_loss(model, video, jax.random.key(0), c)
  assert set(metrics2) == {"recon", "kl", "frame_diff", "psnr", "loss"}
  assert float(metrics2["frame_diff"]) > 0
  assert float(loss2) > float(metrics2["recon"])
  # PSNR on the [0, 1] scale: a reconstruction off by 0.2 in [-1, 1] is off by 0.1 -> 20 dB.
  assert float(quality.psnr(video, video + 0.2)) < 20.5


@pytest.mark.slow  # ~20 s: compiles a train step.
def test_a_few_adam_steps_lower_the_loss(model_and_config):
  model, c = model_and_config
  model = nnx.clone(model)  # The other tests keep the untrained model.
  video = jax.image.resize(_video((2, 5, 4, 4, 3)), (2, 5, 16, 16, 3), "linear")
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, rng):
    grad_fn = nnx.value_and_grad(lambda m: vae_lib.vae_loss(m, video, rng, c), has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    return metrics

  first = step(model, optimizer, jax.random.key(0))
  for i in range(1, 25):
    last = step(model, optimizer, jax.random.key(i))
  assert float(last["loss"]) < 0.6 * float(first["loss"])
  assert float(last["psnr"]) > float(first["psnr"]) + 3


# ------------------------------------------------------------------ FLOPs


def test_flops_match_a_hand_count(tiny_config):
  c = _config(
      tiny_config, temporal_compression=2, spatial_compression=4, widths=(4, 8, 8), latent_channels=2, spatial_only_levels=1
  )
  # T=3, 8x8 -> level 0: 3 frames 8x8 (1x3x3 convs), level 1: 2 frames 4x4 and
  # level 2: 2 frames 2x2 (3x3x3 convs); one res block (two convs) per level.
  conv = lambda kvol, cin, cout, positions: 2 * kvol * cin * cout * positions
  encoder = (
      conv(9, 3, 4, 3 * 64)  # conv_in
      + 2 * conv(9, 4, 4, 3 * 64)  # level 0 block
      + conv(27, 4, 8, 2 * 16)  # down: stride (2, 2, 2)
      + 2 * conv(27, 8, 8, 2 * 16)  # level 1 block
      + conv(27, 8, 8, 2 * 4)  # down: stride (1, 2, 2)
      + 2 * conv(27, 8, 8, 2 * 4)  # level 2 block
      + conv(27, 8, 4, 2 * 4)  # conv_out: mean and logvar
  )
  decoder = (
      conv(27, 2, 8, 2 * 4)  # conv_in
      + 2 * conv(27, 8, 8, 2 * 4)  # level 2 block
      + conv(27, 8, 8, 2 * 16)  # up to 4x4
      + 2 * conv(27, 8, 8, 2 * 16)  # level 1 block
      + conv(27, 8, 16, 2 * 16)  # time up: 2x channels, then 2 frames each (first dropped)
      + conv(9, 8, 4, 3 * 64)  # up to 8x8
      + 2 * conv(9, 4, 4, 3 * 64)  # level 0 block
      + conv(9, 4, 3, 3 * 64)  # conv_out: RGB
  )
  assert vae_lib.vae_flops(c, 3, 8, 8, train=False) == encoder + decoder
  assert vae_lib.vae_flops(c, 3, 8, 8) == 3 * (encoder + decoder)


# ------------------------------------------------------------------ latent statistics


def test_latent_stats_give_posterior_samples_unit_scale():
  rng = np.random.default_rng(0)
  shape = (64, 3, 4, 4, 3)
  means = rng.normal(loc=[3.0, -1.0, 0.0], scale=[2.0, 0.5, 10.0], size=shape)
  stds = np.broadcast_to([0.1, 1.0, 5.0], shape)
  axes = tuple(range(len(shape) - 1))
  count = int(np.prod(shape[:-1]))
  # Streamed in two halves, as the training hook does batch by batch.
  sums = [sum(part.sum(axes) for part in np.split(x, 2)) for x in (means, means**2, stds**2)]
  shift, scale = vae_lib.latent_stats_from_sums(*sums, count)
  assert shift.shape == scale.shape == (3,) and shift.dtype == np.float32
  samples = means + stds * rng.standard_normal(shape)
  normed = ((samples - shift) / scale).reshape(-1, 3)
  np.testing.assert_allclose(normed.mean(0), 0.0, atol=0.05)
  np.testing.assert_allclose(normed.std(0), 1.0, atol=0.05)
  # The posterior spread counts: scale exceeds the std of the means alone where std is large.
  assert scale[2] > means[..., 2].std() and scale[1] > 1.05 * means[..., 1].std()


@pytest.mark.slow  # ~15 s: builds and runs a second model.
def test_attention_stays_within_frames(tiny_config):
  c = _config(tiny_config, widths=(8, 8, 8), attention=True)
  model = vae_lib.VideoVAE(c.vae, rngs=nnx.Rngs(0))
  video = _video((1, 5, 8, 8, 3))
  base, _ = model.encode(video)
  changed, _ = model.encode(video.at[:, 3].add(0.5))
  np.testing.assert_array_equal(changed[:, :1], base[:, :1])
  assert jnp.abs(changed[:, 1] - base[:, 1]).max() > 1e-4
  assert vae_lib.receptive_radius(c) == -1  # Attention reaches the whole frame: no exact halo.
  with_attention = vae_lib.vae_flops(c, 5, 8, 8, train=False)
  without = vae_lib.vae_flops(_config(c, attention=False), 5, 8, 8, train=False)
  # Encoder and decoder attention over 2x2 positions of 2 latent frames: QK^T, AV, qkv, proj.
  attention = 2 * (2 * 2 * 2 * 4**2 * 8 + 2 * 8 * 24 * 2 * 4 + 2 * 8 * 8 * 2 * 4)
  assert with_attention == without + attention
