"""Segment-id attention: every CPU-runnable backend (einsum, xla, splash in Pallas
interpret mode) equals a plain reference on packed rows, and context parallelism over
the mesh's sequence axis (all_gather, ring, ulysses) equals the unsharded result,
for attention alone and for a whole DiT (forward, gradients, train-step losses)."""

import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.models import attention, layers
from vidsim.models.dit import DiT, patch_features

H, D = 4, 8
# Two packed rows of 22 tokens: several segments, a segment of one token (row 0,
# segment 2) and padding (0). 22 does not divide a sequence axis of 4.
Q_IDS = np.array([[1] * 7 + [2] + [3] * 9 + [0] * 5, [1] * 12 + [2] * 5 + [0] * 5], np.int32)
# Three caption slots of 5 keys (slot k -> segment k + 1, 0 = masked text). Row 0's
# slot 2 is empty: its one-token segment has no key and must output 0.
KV_IDS = np.array([[1] * 3 + [0] * 7 + [3] * 5, [1] * 2 + [0] * 3 + [2] * 4 + [0] * 6], np.int32)
NO_KEY = dict(self=Q_IDS == 0, cross=(Q_IDS == 0) | (np.arange(22) == 7) * (np.arange(2) == 0)[:, None])


def _arrays():
  keys = jax.random.split(jax.random.key(0), 6)
  q, k, v = (jax.random.normal(keys[i], (2, 22, H, D)) for i in range(3))
  k_text, v_text = (jax.random.normal(keys[i], (2, 15, H, D)) for i in (3, 4))
  d_out = jax.random.normal(keys[5], (2, 22, H, D))
  return dict(self=(q, k, v, Q_IDS), cross=(q, k_text, v_text, KV_IDS)), d_out


CASES, D_OUT = _arrays()


def reference(q, k, v, q_ids, kv_ids):
  """Masked softmax written out: keys outside the query's segment get weight 0, and a
  query without keys gets the empty sum 0."""
  allowed = ((q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] > 0))[:, None]
  logits = jnp.where(allowed, jnp.einsum("rthd,rshd->rhts", q, k) / np.sqrt(q.shape[-1]), -1e9)
  weights = jnp.exp(logits - logits.max(-1, keepdims=True)) * allowed
  total = weights.sum(-1, keepdims=True)
  return jnp.einsum("rhts,rshd->rthd", weights / jnp.where(total > 0, total, 1), v)


def loss_and_grads(fn, q, k, v):
  """sum(attention * D_OUT) and its gradients wrt q, k, v: forward and backward at once."""
  return jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * D_OUT).sum(), argnums=(0, 1, 2)))(q, k, v)


def assert_close(got, want, atol):
  # rtol for the summed loss (~20): its float32 rounding depends on the reduction order,
  # which the compiler picks (1.5e-6 relative seen); atol holds the gradients.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("impl", ["einsum", "xla", "splash"])
def test_backend_equals_reference(impl, kind):
  q, k, v, kv_ids = CASES[kind]
  out = attention.attend(q, k, v, Q_IDS, kv_ids, impl=impl)
  np.testing.assert_allclose(out, reference(q, k, v, Q_IDS, kv_ids), atol=2e-6)
  # Keyless queries (padding, the segment whose caption is empty): exactly 0.
  assert np.all(np.asarray(out)[NO_KEY[kind]] == 0)
  got = loss_and_grads(lambda q, k, v: attention.attend(q, k, v, Q_IDS, kv_ids, impl=impl), q, k, v)
  want = loss_and_grads(lambda q, k, v: reference(q, k, v, Q_IDS, kv_ids), q, k, v)
  assert_close(got, want, atol=2e-5)
  d_q, d_k, _ = got[1]
  assert np.all(np.asarray(d_q)[NO_KEY[kind]] == 0)  # ... and no gradient.
  assert np.all(np.asarray(d_k)[kv_ids == 0] == 0)  # Padding / masked keys are never used.


def test_einsum_remat_recomputes_only_the_logits():
  """Under the "dots" remat policy the einsum backward recomputes only the logits: 8
  dot_generals in all (forward logits and values; backward logits, dV, dP, dQ, dK and
  the dO.O row sum), where recomputing the whole forward would make 10."""
  q, k, v, kv_ids = CASES["self"]

  def loss(q, k, v):
    return (attention.einsum_attention(q, k, v, Q_IDS, kv_ids) * D_OUT).sum()

  policy = layers.REMAT_POLICIES["dots"]
  jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2)))(q, k, v)
  assert str(jaxpr).count("dot_general") == 8


def test_auto_and_bad_choices():
  assert attention.resolve_impl("auto") == "einsum"  # On CPU.
  q, k, v, kv_ids = CASES["self"]
  with pytest.raises(UsageError, match=r"'flash' is not one of \['auto', 'einsum', 'xla', 'cudnn', 'splash'\]"):
    attention.attend(q, k, v, Q_IDS, kv_ids, impl="flash")
  with pytest.raises(UsageError, match=r"'rings' is not one of \['all_gather', 'ring', 'ulysses'\]"):
    attention.attend(q, k, v, Q_IDS, kv_ids, impl="einsum", context_parallel="rings")
  with pytest.raises(UsageError, match="block_q = 100: use a positive multiple of 128"):
    attention.check_block_sizes(dict(block_q=100))
  with pytest.raises(UsageError, match="dit.attention_block_sizes.block_x is not a splash block size"):
    attention.check_block_sizes(dict(block_x=128))
  with pytest.raises(UsageError, match="segment ids"):
    attention.attend(q, k, v, Q_IDS[:, :5], kv_ids, impl="einsum")


# ------------------------------------------------------------------ context parallelism

MESHES = {
    "sequence4": dict(data=2, fsdp=1, sequence=4, tensor=1),
    "sequence2_fsdp2_tensor2": dict(data=1, fsdp=2, sequence=2, tensor=2),
}


def mesh_config(ici, base=None, **dit):
  c = (base or config_lib.base_config()).copy_and_resolve_references()
  with c.unlocked():
    c.mesh.ici.update(ici)
    c.dit.update(dit)
  return c


@pytest.mark.parametrize("layout", list(MESHES))
def test_context_parallel_attention_equals_unsharded(layout):
  """Each strategy, self- and cross-attention, forward and gradients: the rows are split
  along their 22 tokens (padded to 24 inside on sequence=4); the splash kernel (interpret
  mode) runs inside the same shard_map as einsum."""
  c = mesh_config(MESHES[layout])
  mesh = mesh_lib.make_mesh(c)
  runs = [(impl, cp) for impl in ("einsum",) for cp in attention.CONTEXT_PARALLEL] + [("splash", "all_gather")]
  for kind, (q, k, v, kv_ids) in CASES.items():
    want = loss_and_grads(lambda q, k, v: reference(q, k, v, Q_IDS, kv_ids), q, k, v)
    for impl, cp in runs:
      fn = lambda q, k, v: attention.attend(
          q, k, v, Q_IDS, kv_ids, impl=impl, context_parallel=cp, kv_sharded=kind == "self"
      )
      with mesh_lib.activate(mesh, c):
        got = loss_and_grads(fn, q, k, v)
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
      # Really split along the length, with the strategy's own collective (none for captions).
      assert "shard_map" in jaxpr and "P(('data', 'fsdp'), 'sequence'" in jaxpr, jaxpr
      collective = dict(all_gather="all_gather", ring="ppermute", ulysses="all_to_all")[cp]
      assert (collective in jaxpr) == (kind == "self"), (impl, cp, kind)
      assert_close(got, want, atol=5e-5)


def test_rows_that_do_not_divide_the_batch_axes_and_ulysses_head_check():
  """One row on data=2: the rows stay whole (replicated) and gradients are not double
  counted; ulysses with 4 heads over tensor=2 x sequence=4 cannot split: a UsageError."""
  q, k, v, kv_ids = (x[:1] for x in CASES["self"])
  want = jax.grad(lambda q: (reference(q, k, v, Q_IDS[:1], kv_ids) * D_OUT[:1]).sum())(q)
  c = mesh_config(dict(data=2, fsdp=1, sequence=4, tensor=1))
  with mesh_lib.activate(mesh_lib.make_mesh(c), c):
    got = jax.jit(jax.grad(lambda q: (attention.attend(q, k, v, Q_IDS[:1], kv_ids, impl="einsum") * D_OUT[:1]).sum()))(q)
  np.testing.assert_allclose(got, want, atol=5e-5)
  c = mesh_config(dict(data=1, fsdp=1, sequence=4, tensor=2))
  with mesh_lib.activate(mesh_lib.make_mesh(c), c), pytest.raises(UsageError, match="ulysses.*2 heads per shard"):
    attention.attend(q, k, v, Q_IDS[:1], kv_ids, impl="einsum", context_parallel="ulysses")


# ------------------------------------------------------------------ the DiT under context parallelism

L, K, S = 22, 2, 8  # Row tokens (does not divide sequence=4), caption slots, caption bytes.


@pytest.fixture(scope="module")
def dit_config():
  c = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "experiments" / "digits_tiny.py"))
  with c.unlocked():
    c.text.max_length = S
    c.dit.heads = 4  # Head dim 8; ulysses needs heads per tensor shard divisible by sequence.
    c.dit.attention_impl = "einsum"
  return c


def dit_batch(config):
  """4 rows: two segments (the second with an empty caption), one, and padding."""
  rng = np.random.default_rng(0)
  segments = np.array([[1] * 12 + [2] * 6 + [0] * 4, [1] * 20 + [0] * 2, [1] * 9 + [2] * 9 + [0] * 4, [1] * 22])
  positions = np.stack([np.arange(L) // 6, np.arange(L) // 3 % 2, np.arange(L) % 3], -1)
  text = rng.integers(1, 200, size=(4, K, S)).astype(np.int32)
  text_mask = np.ones((4, K, S), bool)
  text_mask[0, 1] = False  # Empty caption of row 0's segment 2.
  text_mask[2, :, 5:] = False
  return dict(
      tokens=rng.normal(size=(4, L, patch_features(config))).astype(np.float32),
      t=rng.uniform(size=(4, L)).astype(np.float32),
      positions=np.broadcast_to(positions, (4, L, 3)).astype(np.int32),
      segment_ids=segments.astype(np.int32),
      text_tokens=np.where(text_mask, text, 0), text_mask=text_mask,
      noise=rng.normal(size=(4, L, patch_features(config))).astype(np.float32),
  )


def rf_loss(model, batch):
  x0, noise, t = batch["tokens"], batch["noise"], batch["t"]
  text = dict(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])
  drop = jnp.zeros(batch["text_tokens"].shape[:2], bool)
  v = model((1 - t[..., None]) * x0 + t[..., None] * noise, t, batch["positions"], batch["segment_ids"], text, drop)
  weight = (batch["segment_ids"] > 0)[..., None]
  return jnp.sum(weight * jnp.square(v - (noise - x0))) / (weight.sum() * x0.shape[-1]), v


def train(config, mesh=None, steps=3, lr=0.5):
  """SGD steps on one batch from perturbed params: (first-step output, first-step
  grads, losses). Plain SGD keeps the compile small; the point is the gradients."""
  batch = dit_batch(config)
  scope = lambda: mesh_lib.activate(mesh, config) if mesh is not None else contextlib.nullcontext()
  with scope():
    model = DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0))
    if mesh is not None:
      batch = mesh_lib.make_global_batch(batch, mesh, config)
  graphdef, params = nnx.split(model, nnx.Param)
  # Perturb every param: at init the zero gates make every block the identity.
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)
  ])

  @jax.jit
  def step(params, batch):
    loss_fn = lambda p: rf_loss(nnx.merge(graphdef, p), batch)
    (loss, v), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss, v, grads

  results = []
  with scope():
    for _ in range(steps):
      params, loss, v, grads = step(params, batch)
      results.append((float(loss), v, grads))
  return results[0][1], results[0][2], [r[0] for r in results]


@pytest.fixture(scope="module")
def unsharded(dit_config):
  return train(dit_config)


# Each strategy once and both meshes (every strategy on both meshes is covered above for
# attention alone; each DiT case costs a compile).
@pytest.mark.parametrize(
    "layout, strategy",
    [("sequence4", "all_gather"), ("sequence4", "ring"), ("sequence2_fsdp2_tensor2", "ulysses")],
)
def test_dit_context_parallel_equals_unsharded(dit_config, unsharded, layout, strategy):
  """Rows of 22 tokens (padded to 24 inside attention on sequence=4), two segments, an
  empty caption and padding: the output, every gradient and 3 SGD losses match."""
  c = mesh_config(MESHES[layout], dit_config, context_parallel=strategy)
  out, grads, losses = train(c, mesh_lib.make_mesh(c))
  want_out, want_grads, want_losses = unsharded
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=5e-5)
  assert_close(grads, want_grads, atol=5e-5)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
