"""DiT model behaviour: packing is exact, masks mask, time is per token, caption
dropout, overfitting, golden partition specs, and the same loss/grads on a mesh."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.models import layers
from vidsim.models.dit import DiT, patch_features
from vidsim.models.text import detokenize_bytes, pool_words, tokenize_bytes

GOLDEN = pathlib.Path(__file__).parent / "golden" / "dit_partition_specs.json"
K = 2  # Segments per row in these tests.


def build(config, seed=0, mesh=None):
  if mesh is None:
    return DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(seed))  # No mesh: unsharded params.
  with mesh_lib.activate(mesh, config):
    return DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(seed))


def build_with(config, **dit):
  """build() from a copy of `config` with some dit.* settings changed."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.dit.update(dit)
  return build(c)


def randomize(model, seed=1, scale=0.1):
  """Perturbs every param: at init the zero-init gates make blocks the identity and
  the output 0, which would let a mask test pass without testing anything."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


def sample(grid, caption, time, seed):
  return dict(grid=grid, caption=caption, time=time, seed=seed)


def pack_rows(config, rows, length):
  """Rows of samples -> the packed batch format (tokens, positions, segment ids, text)."""
  p = patch_features(config)
  s = config.text.max_length
  batch = dict(
      tokens=np.zeros((len(rows), length, p), np.float32),
      t=np.zeros((len(rows), length), np.float32),
      positions=np.zeros((len(rows), length, 3), np.int32),
      segment_ids=np.zeros((len(rows), length), np.int32),
      text_tokens=np.zeros((len(rows), K, s), np.int32),
      text_mask=np.zeros((len(rows), K, s), bool),
  )
  for r, row in enumerate(rows):
    start = 0
    for k, smp in enumerate(row):
      n = int(np.prod(smp["grid"]))
      grid = np.stack(np.meshgrid(*[np.arange(g) for g in smp["grid"]], indexing="ij"), -1).reshape(n, 3)
      batch["tokens"][r, start : start + n] = np.random.default_rng(smp["seed"]).normal(size=(n, p))
      batch["t"][r, start : start + n] = smp["time"]
      batch["positions"][r, start : start + n] = grid
      batch["segment_ids"][r, start : start + n] = k + 1
      ids, mask = tokenize_bytes([smp["caption"]], s)
      batch["text_tokens"][r, k], batch["text_mask"][r, k] = ids[0], mask[0]
      start += n
    # Padding tokens get junk features: they must not matter.
    batch["tokens"][r, start:] = 7.0
  return batch


@nnx.jit
def _apply(model, batch, drop):
  text = dict(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])
  return model(batch["tokens"], batch["t"], batch["positions"], batch["segment_ids"], text, drop)


def forward(model, batch, drop=None):
  drop = np.zeros(batch["text_tokens"].shape[:2], bool) if drop is None else drop
  return np.asarray(_apply(model, batch, drop))


A = sample((2, 2, 3), "a red 3 moves right", 0.3, seed=1)
B = sample((1, 3, 2), "a blue 7", 0.8, seed=2)


@pytest.fixture(scope="module")
def config():
  c = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "experiments" / "digits_tiny.py"))
  with c.unlocked():
    c.text.max_length = 24
  return c


@pytest.fixture(scope="module")
def model(config):
  return randomize(build(config))


def test_output_shape_finite_and_zero_at_init(config):
  fresh = build(config)
  batch = pack_rows(config, [[A, B], [sample((1, 2, 2), "", 0.5, 3)]], 24)  # Empty caption, padding.
  out = forward(fresh, batch)
  assert out.shape == (2, 24, patch_features(config))
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero / zero final layer.
  out = forward(randomize(fresh), batch)
  assert np.isfinite(out).all() and np.abs(out).max() > 1e-3


def test_packed_row_equals_each_segment_alone(config, model):
  batch = pack_rows(config, [[A, B], [A], [B]], 24)
  out = forward(model, batch)
  np.testing.assert_allclose(out[0, :12], out[1, :12], atol=2e-5)
  np.testing.assert_allclose(out[0, 12:18], out[2, :6], atol=2e-5)


def test_sincos_position_embedding_tells_tokens_where_they_are(config):
  """Identical tokens: with RoPE only every one gets the same output (attention over equal
  values is that value); with dit.position_embedding="sincos" they differ by position,
  and packing stays exact (each segment's own positions)."""
  batch = pack_rows(config, [[A, B], [A], [B]], 24)
  batch["tokens"][:] = 0.5
  placed = randomize(build_with(config, position_embedding="sincos"))
  same = forward(randomize(build(config)), batch)[1, :12]
  np.testing.assert_allclose(same, np.broadcast_to(same[:1], same.shape), atol=1e-5)
  out = forward(placed, batch)
  assert np.abs(out[1, :12] - out[1, :1]).max() > 1e-3
  np.testing.assert_allclose(out[0, :12], out[1, :12], atol=2e-5)
  np.testing.assert_allclose(out[0, 12:18], out[2, :6], atol=2e-5)
  emb = np.asarray(layers.sincos_position_embedding(jnp.asarray([[0, 0, 0], [0, 0, 1], [1, 0, 0]]), 256))
  assert emb.shape == (3, 256) and len({tuple(np.round(e, 5)) for e in emb}) == 3


def test_einsum_attention_equals_dot_product_attention(config, model):
  """The CPU-fast einsum path computes what jax.nn.dot_product_attention does."""
  batch = pack_rows(config, [[A, B], [sample((1, 2, 2), "", 0.5, 3)]], 24)
  einsum_model = randomize(build_with(config, attention_impl="einsum"))
  np.testing.assert_allclose(forward(einsum_model, batch), forward(randomize(build(config)), batch), atol=1e-5)


def test_masked_inputs_change_nothing(config, model):
  batch = pack_rows(config, [[A, B]], 24)
  base = forward(model, batch)

  changed = {k: v.copy() for k, v in batch.items()}
  changed["text_tokens"][0, 1, 20] = 99  # Past the end of caption B: text_mask is False.
  np.testing.assert_array_equal(forward(model, changed), base)

  changed = {k: v.copy() for k, v in batch.items()}
  changed["tokens"][0, 20] = -3.0  # A padding token.
  np.testing.assert_allclose(forward(model, changed)[0, :18], base[0, :18], atol=1e-6)

  changed = {k: v.copy() for k, v in batch.items()}
  changed["tokens"][0, 13] += 1.0  # A token of segment B.
  out = forward(model, changed)
  np.testing.assert_allclose(out[0, :12], base[0, :12], atol=1e-6)
  assert np.abs(out[0, 12:18] - base[0, 12:18]).max() > 1e-4

  changed = {k: v.copy() for k, v in batch.items()}
  changed["text_tokens"][0, 1, :3] = [66, 67, 68]  # Caption of segment B.
  out = forward(model, changed)
  np.testing.assert_allclose(out[0, :12], base[0, :12], atol=1e-6)
  assert np.abs(out[0, 12:18] - base[0, 12:18]).max() > 1e-4


def test_time_is_per_token(config, model):
  batch = pack_rows(config, [[A, B]], 24)
  base = forward(model, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  changed["t"][0, 0] = 0.0  # One clean conditioning token in segment A.
  out = forward(model, changed)
  assert np.abs(out[0, 0] - base[0, 0]).max() > 1e-3
  assert np.abs(out[0, 1:12] - base[0, 1:12]).max() > 1e-5  # Others see it through attention.
  np.testing.assert_allclose(out[0, 12:], base[0, 12:], atol=1e-6)


def test_caption_dropout_uses_the_null_caption(config, model):
  batch = pack_rows(config, [[A, B]], 24)
  other = pack_rows(config, [[sample((2, 2, 3), "something else", 0.3, 1), B]], 24)
  drop = np.array([[True, False]])
  dropped = forward(model, batch, drop)
  assert np.abs(dropped[0, :12] - forward(model, batch)[0, :12]).max() > 1e-4
  np.testing.assert_array_equal(forward(model, other, drop)[0, :12], dropped[0, :12])
  np.testing.assert_allclose(dropped[0, 12:18], forward(model, batch)[0, 12:18], atol=1e-6)
  # An empty caption that is dropped is still the null caption (no NaN, same output).
  empty = pack_rows(config, [[sample((2, 2, 3), "", 0.3, 1), B]], 24)
  np.testing.assert_allclose(forward(model, empty, drop)[0, :12], dropped[0, :12], atol=1e-6)


def rf_loss(model, batch, noise):
  """Rectified-flow v loss on real tokens (the flow module owns the real one)."""
  x0 = batch["tokens"]
  t = batch["t"][..., None]
  x_t = (1 - t) * x0 + t * noise
  text = dict(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])
  drop = jnp.zeros(batch["text_tokens"].shape[:2], bool)
  v = model(x_t, batch["t"], batch["positions"], batch["segment_ids"], text, drop)
  weight = (batch["segment_ids"] > 0)[..., None]
  return jnp.sum(weight * jnp.square(v - (noise - x0))) / (weight.sum() * x0.shape[-1])


def adam_steps(model, batch, seed=0):
  """A jitted AdamW(3e-3) step on `batch` with fixed noise: () -> (loss, grads)."""
  noise = np.random.default_rng(seed).normal(size=batch["tokens"].shape).astype(np.float32)
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(rf_loss)(model, batch, noise)
    optimizer.update(model, grads)
    return loss, grads

  return lambda: step(model, optimizer)


def test_overfits_one_batch(config):
  step = adam_steps(build(config), pack_rows(config, [[A, B], [B, A]], 24))
  losses = [float(step()[0]) for _ in range(100)]
  assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_fresh_blocks_learn_through_their_zero_gates(config):
  """From the real init (gates 0, final layer 0), after three steps the gates and the
  projections they multiply must get gradients, and the output must depend on the
  token positions. With a zero-init projection behind a zero gate both gradients stay
  exactly 0 forever: the self-attention and MLP never move, so RoPE positions do
  nothing."""
  model = build(config)
  batch = pack_rows(config, [[A, B], [B, A]], 24)
  step = adam_steps(model, batch)
  for _ in range(3):  # Step 1 moves only the zero-init final layer, step 2 the gates.
    _, grads = step()
  norms = {"/".join(str(getattr(k, "key", k)) for k in path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]}
  for name in ("blocks/modulation", "time_modulation/kernel", "blocks/attn/out/kernel", "blocks/mlp/wo/kernel",
               "blocks/attn/qkv/kernel"):
    assert norms.get(name, 0.0) > 0, (name, norms)
  still = dict(batch, positions=np.zeros_like(batch["positions"]))
  assert float(jnp.max(jnp.abs(forward(model, batch) - forward(model, still)))) > 1e-5


@pytest.mark.slow
def test_remat_and_swiglu_match_shapes_and_grads(config):
  batch = pack_rows(config, [[A, B]], 24)
  noise = np.ones_like(batch["tokens"])
  grads = {}
  for remat in ("none", "full", "dots"):
    model = randomize(build_with(config, remat=remat, mlp="swiglu"))
    grads[remat] = nnx.jit(nnx.grad(rf_loss))(model, batch, noise)
  for remat in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads["none"], grads[remat])


def test_bad_inputs_raise_usage_errors(config, model):
  with pytest.raises(UsageError, match="dit.position_embedding='learned'; valid: none, sincos"):
    build_with(config, position_embedding="learned")
  batch = pack_rows(config, [[A, B]], 24)
  with pytest.raises(UsageError, match="features"):
    model(batch["tokens"][..., :5], batch["t"], batch["positions"], batch["segment_ids"],
          dict(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"]), np.zeros((1, K), bool))
  with pytest.raises(UsageError, match="text_tokens"):
    model(batch["tokens"], batch["t"], batch["positions"], batch["segment_ids"],
          dict(text_mask=batch["text_mask"]), np.zeros((1, K), bool))


def test_precomputed_text_encoder(config):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.text.encoder = "precomputed"
    c.text.embed_dim = 12
  model = randomize(build(c))
  batch = pack_rows(c, [[A, B]], 24)
  emb = np.random.default_rng(0).normal(size=batch["text_mask"].shape + (12,)).astype(np.float32)
  text = dict(text_embeddings=emb, text_mask=batch["text_mask"])
  drop = np.zeros((1, K), bool)
  out = model(batch["tokens"], batch["t"], batch["positions"], batch["segment_ids"], text, drop)
  emb2 = emb.copy()
  emb2[0, 0, 23] = 5.0  # Masked text position of caption A.
  out2 = model(batch["tokens"], batch["t"], batch["positions"], batch["segment_ids"],
               dict(text_embeddings=emb2, text_mask=batch["text_mask"]), drop)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-6)


# ------------------------------------------------------------------ partitioning


def mesh_config(base):
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.mesh.ici.data, c.mesh.ici.fsdp, c.mesh.ici.sequence, c.mesh.ici.tensor = 2, 2, 1, 2
  return c


def spec_json(spec):
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def partition_table(config):
  """Every param path -> shape, logical spec and mesh spec on a (2, 2, 2) mesh."""
  abstract = nnx.eval_shape(lambda: DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  mesh = mesh_lib.make_mesh(config, jax.devices()[:8])
  logical = nnx.get_partition_spec(params)
  shardings = mesh_lib.param_shardings(params, mesh, config)
  table = {}
  for (path, var), (_, spec), (_, sharding) in zip(
      nnx.to_flat_state(params), nnx.to_flat_state(logical), nnx.to_flat_state(shardings)
  ):
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
    table["/".join(map(str, path))] = dict(
        shape=list(var.shape), logical=spec_json(spec), mesh=spec_json(sharding.spec)
    )
  return table


def test_golden_partition_specs():
  table = partition_table(mesh_config(config_lib.base_config()))
  if os.environ.get("VIDSIM_UPDATE_GOLDENS") == "1":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
  golden = json.loads(GOLDEN.read_text())
  assert table == golden, "partition specs changed; regenerate with VIDSIM_UPDATE_GOLDENS=1 and review the diff"
  # Every scanned block param keeps its stacked axis.
  for path, entry in table.items():
    if path.startswith("blocks/") or path.startswith("text/blocks/"):
      assert entry["logical"][0] == "layers", path


def test_mesh_forward_backward_matches_single_device(config):
  c = mesh_config(config)
  batch = pack_rows(c, [[A, B], [B], [A], [B, A]], 24)
  noise = np.random.default_rng(0).normal(size=batch["tokens"].shape).astype(np.float32)

  single = randomize(build(c))
  loss1, grads1 = nnx.jit(nnx.value_and_grad(rf_loss))(single, batch, noise)

  mesh = mesh_lib.make_mesh(c, jax.devices()[:8])
  sharded = build(c, mesh=mesh)
  with mesh_lib.activate(mesh, c):
    nnx.update(sharded, jax.device_put(nnx.state(single, nnx.Param), mesh_lib.param_shardings(
        nnx.state(sharded, nnx.Param), mesh, c)))
    global_batch = mesh_lib.make_global_batch(batch, mesh, c)
    global_noise = mesh_lib.make_global_batch(noise, mesh, c)
    loss8, grads8 = nnx.jit(nnx.value_and_grad(rf_loss))(sharded, global_batch, global_noise)
  qkv = nnx.state(sharded, nnx.Param)["blocks"]["attn"]["qkv"]["kernel"][...]
  assert len(qkv.sharding.device_set) == 8  # The params really are spread over the mesh.
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5), grads8, grads1)


def test_layer_helpers_validate():
  with pytest.raises(UsageError, match="remat"):
    layers.run_layers(None, None, remat="sometimes")
  with pytest.raises(UsageError, match="attention_impl"):
    layers.attention_impl("flash")
  assert layers.rope_pairs(64) == (12, 10, 10)


def test_tokenize_bytes_format():
  ids, mask = tokenize_bytes(["ab", "", "é"], 3)
  np.testing.assert_array_equal(ids, [[98, 99, 0], [0, 0, 0], [0xC3 + 1, 0xA9 + 1, 0]])
  np.testing.assert_array_equal(mask, ids > 0)
  assert tokenize_bytes(["abcdef"], 4)[0].tolist() == [[98, 99, 100, 101]]  # Cut at max_length.
  assert detokenize_bytes(ids) == ["ab", "", "é"]


def test_word_keys_are_the_mean_of_each_words_bytes():
  ids, mask = tokenize_bytes(["a red 3 moves", " two  spaces", ""], 16)
  x = np.random.default_rng(0).normal(size=(3, 16, 4)).astype(np.float32)
  pooled, words = pool_words(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(words).sum(1), [4, 2, 0])  # Empty words are dropped.
  expected = {(0, 0): x[0, 0], (0, 1): x[0, 2:5].mean(0), (0, 2): x[0, 6], (0, 3): x[0, 8:13].mean(0),
              (1, 0): x[1, 1:4].mean(0), (1, 1): x[1, 6:12].mean(0)}
  for (row, word), value in expected.items():
    np.testing.assert_allclose(pooled[row, word], value, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pooled)[~np.asarray(words)], 0.0)


def test_word_keys_keep_packing_exact_and_read_each_word(config):
  """text.units="words": a packed row still equals each segment alone, and the digit, one
  key among the caption's words, changes v."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.text.units = "words"
  model = randomize(build(c))
  batch = pack_rows(c, [[A, B], [A], [B]], 24)
  out = forward(model, batch)
  np.testing.assert_allclose(out[0, :12], out[1, :12], atol=2e-5)
  np.testing.assert_allclose(out[0, 12:18], out[2, :6], atol=2e-5)
  other = forward(model, pack_rows(c, [[dict(A, caption="a red 8 moves right"), B]], 24))
  assert np.abs(other[0, :12] - out[0, :12]).max() > 1e-3
  np.testing.assert_allclose(other[0, 12:18], out[0, 12:18], atol=2e-5)
  with c.unlocked():
    c.text.units = "letters"
  with pytest.raises(UsageError, match="text.units='letters'; valid: bytes, words"):
    build(c)
  with c.unlocked():
    c.text.units, c.text.encoder, c.text.embed_dim = "words", "precomputed", 8
  with pytest.raises(UsageError, match="text.units='words' pools the byte encoder"):
    build(c)


def test_bfloat16_compute_keeps_fp32_params(config, model):
  low = build_with(config, dtype="bfloat16")
  nnx.update(low, nnx.state(model, nnx.Param))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(low, nnx.Param))} == {jnp.dtype(jnp.float32)}
  batch = pack_rows(config, [[A, B]], 24)
  out, ref = forward(low, batch), forward(model, batch)
  assert np.isfinite(out).all()
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
