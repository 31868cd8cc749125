"""Transformer pieces shared by the DiT and the byte text encoder.

Attention (fused self-attention and cross-attention, both masked by segment ids
through `vidsim.models.attention.attend`), 3D RoPE
over per-token (t, h, w) positions, QK-norm, GELU / SwiGLU MLPs, the sinusoidal
timestep embedding, adaLN helpers and the scanned layer stack. Every parameter
carries logical axis names (see config.mesh.rules); stacked layers get the extra
leading "layers" axis.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vidsim.errors import UsageError
from vidsim.models import attention

# Initialisers: DiT / PixArt use xavier-uniform for projections and zeros for the
# adaLN modulation (so every gate starts at 0 and a fresh block is the identity) and
# the final layer. A projection that feeds a zero gate must NOT also start at zero:
# gate * out(x) then has a zero gradient for both, forever: the self-attention and MLP
# of such a DiT never move (tests/test_dit_model.py checks the gradients).
xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()

# The stacked axis of scanned layers: its logical name, in the param metadata.
LAYERS = {nnx.PARTITION_NAME: "layers"}

REMAT_POLICIES = {
    "full": None,  # Save nothing; recompute the whole layer in the backward pass.
    # Keep matmul outputs without batch dims (the projections) and the einsum / ring
    # attention's output and log-sum-exp (attention.einsum_attention); recompute the rest.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    ),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def partitioned(init, *names):
  """An initialiser whose Param carries these logical axis names."""
  return nnx.with_partitioning(init, names)


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UsageError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def attention_impl(name: str):
  """Validates dit.attention_impl (see vidsim.models.attention.IMPLS)."""
  return attention.check_impl(name)


# ------------------------------------------------------------------ norms


def layer_norm(x, eps=1e-6):
  """Parameter-free LayerNorm in fp32 (adaLN supplies the scale and shift)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


def rms_norm(features, dtype, rngs):
  return nnx.RMSNorm(
      features, dtype=dtype, scale_init=partitioned(ones, "norm"), rngs=rngs
  )


# ------------------------------------------------------------------ 3D RoPE


def rope_pairs(head_dim: int):
  """Rotation pairs per axis (t, h, w) for a head of `head_dim` features.

  The head_dim/2 rotation pairs are split as h = w = floor(pairs/3) and
  t = the rest, so t gets the remainder (e.g. head_dim 64: t 12, h 10, w 10 pairs).
  Each axis has its own frequency ladder theta^(-i/n_axis).
  """
  if head_dim % 2:
    raise UsageError(f"attention head dim {head_dim} must be even for RoPE (dit.width / dit.heads)")
  pairs = head_dim // 2
  spatial = pairs // 3
  if spatial == 0:
    raise UsageError(f"attention head dim {head_dim} is too small for 3D RoPE: need >= 6")
  return (pairs - 2 * spatial, spatial, spatial)


def rope_angles(positions, head_dim: int, theta: float):
  """positions int [..., 3] (t, h, w) -> (cos, sin) [..., 1, head_dim/2] (1 = heads)."""
  parts = []
  for axis, n in enumerate(rope_pairs(head_dim)):
    inv_freq = theta ** (-jnp.arange(n, dtype=jnp.float32) / n)
    parts.append(positions[..., axis : axis + 1].astype(jnp.float32) * inv_freq)
  angles = jnp.concatenate(parts, axis=-1)[..., None, :]
  return jnp.cos(angles), jnp.sin(angles)


def sincos_position_embedding(positions, width: int, theta: float = 10000.0):
  """positions int [..., 3] (t, h, w) -> float32 [..., width]: fixed sin/cos features of
  each axis's index (h and w get floor(width/6)*2 features each, t the rest).

  Added to the patch embeddings, they tell a token where it is in its clip, which RoPE
  (relative offsets only) does not: a token on pure noise needs that to predict a
  position-dependent mean, such as where a digit that "moves right" starts.
  """
  spatial = (width // 6) * 2
  parts = []
  for axis, n in enumerate((width - 2 * spatial, spatial, spatial)):
    inv_freq = theta ** (-jnp.arange(n // 2, dtype=jnp.float32) / max(n // 2, 1))
    angles = positions[..., axis : axis + 1].astype(jnp.float32) * inv_freq
    parts += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x, cos, sin):
  """Rotates feature pairs (i, i + D/2) of x [..., heads, D] by the angles."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# ------------------------------------------------------------------ attention


class SelfAttention(nnx.Module):
  """Fused-qkv multi-head self-attention with optional QK-norm and RoPE."""

  def __init__(self, width, heads, *, qk_norm, dtype, impl, rngs, context_parallel=None, block_sizes=None):
    """context_parallel / block_sizes: see attention.attend (None: the length is never
    split over the mesh, e.g. the text encoder's captions)."""
    if width % heads:
      raise UsageError(f"width {width} is not divisible by heads {heads}")
    head_dim = width // heads
    self.impl = attention.check_impl(impl)
    self.context_parallel = attention.check_context_parallel(context_parallel)
    self.block_sizes = tuple(sorted(attention.check_block_sizes(block_sizes).items()))
    # One [width, 3, heads, head_dim] kernel: one matmul for q, k and v.
    self.qkv = nnx.Einsum(
        "rld,dnhk->rlnhk", (width, 3, heads, head_dim), dtype=dtype,
        kernel_init=partitioned(xavier, "embed", None, "heads", "kv"), rngs=rngs,
    )
    self.out = nnx.Einsum(
        "rlhk,hkd->rld", (heads, head_dim, width), dtype=dtype,
        kernel_init=partitioned(xavier, "heads", "kv", "embed"), rngs=rngs,
    )
    self.q_norm = rms_norm(head_dim, dtype, rngs) if qk_norm else None
    self.k_norm = rms_norm(head_dim, dtype, rngs) if qk_norm else None

  def __call__(self, x, segment_ids, rope=None):
    """segment_ids int [R, L]: tokens attend within their segment; 0 = padding."""
    q, k, v = jnp.unstack(self.qkv(x), axis=2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention.attend(
        q, k, v, segment_ids, segment_ids, impl=self.impl, context_parallel=self.context_parallel,
        block_sizes=dict(self.block_sizes), kv_sharded=True,
    )
    return self.out(out)


class CrossAttention(nnx.Module):
  """Queries from the image tokens, keys and values from the text tokens."""

  def __init__(self, width, context_width, heads, *, qk_norm, dtype, impl, rngs, context_parallel=None,
               block_sizes=None):
    head_dim = width // heads
    self.impl = attention.check_impl(impl)
    self.context_parallel = attention.check_context_parallel(context_parallel)
    self.block_sizes = tuple(sorted(attention.check_block_sizes(block_sizes).items()))
    self.q = nnx.Einsum(
        "rld,dhk->rlhk", (width, heads, head_dim), dtype=dtype,
        kernel_init=partitioned(xavier, "embed", "heads", "kv"), rngs=rngs,
    )
    self.kv = nnx.Einsum(
        "rsd,dnhk->rsnhk", (context_width, 2, heads, head_dim), dtype=dtype,
        kernel_init=partitioned(xavier, "embed", None, "heads", "kv"), rngs=rngs,
    )
    self.out = nnx.Einsum(
        "rlhk,hkd->rld", (heads, head_dim, width), dtype=dtype,
        kernel_init=partitioned(zeros, "heads", "kv", "embed"), rngs=rngs,
    )
    self.q_norm = rms_norm(head_dim, dtype, rngs) if qk_norm else None
    self.k_norm = rms_norm(head_dim, dtype, rngs) if qk_norm else None

  def __call__(self, x, context, segment_ids, context_segment_ids, slots=None):
    """segment_ids [R, L] of the queries; context_segment_ids [R, S] of the keys (0 =
    not a key). A query whose segment has no key (an empty caption) gets 0.

    slots: None, or (slot_tokens [R, K, M], back [R, L]) from `caption_slots`, with
    context [R, K, S, C] and context_segment_ids [R, K, S]: each slot's M gathered
    queries attend to its own S keys only, and every token takes its output back from
    its place in its slot. The same result as the flattened K*S keys, without the
    scores of every token against the other K - 1 captions."""
    q = self.q(x)
    if slots is not None:
      r, k_slots, s, c = context.shape
      context = context.reshape(r, k_slots * s, c)
    k, v = jnp.unstack(self.kv(context), axis=2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    call = functools.partial(attention.attend, impl=self.impl, block_sizes=dict(self.block_sizes), kv_sharded=False)
    if slots is None:
      return self.out(call(q, k, v, segment_ids, context_segment_ids, context_parallel=self.context_parallel))
    slot_tokens, back = slots
    m = slot_tokens.shape[2]
    h, d = q.shape[2:]
    per_slot = lambda a: a.reshape((r * k_slots, -1) + a.shape[2:])
    queries = jnp.take_along_axis(q, jnp.maximum(slot_tokens, 0).reshape(r, k_slots * m, 1, 1), axis=1)
    ids = lambda a: (a.reshape(r * k_slots, -1) > 0).astype(jnp.int32)  # 1: a query / key of the slot.
    out = call(per_slot(queries), per_slot(k), per_slot(v), ids(slot_tokens + 1), ids(context_segment_ids),
               context_parallel=None)
    out = jnp.take_along_axis(out.reshape(r, k_slots * m, h, d), back[:, :, None, None], axis=1)
    return self.out(jnp.where((segment_ids > 0)[:, :, None, None], out, 0))


def caption_slots(segment_ids, slot_tokens):
  """(slot_tokens [R, K, M], back [R, L]) for CrossAttention's per-slot path: back is
  each token's index into the K*M gathered queries (slot * M + its offset in the
  segment; 0 for padding, whose output is zeroed). slot_tokens is the packed batch's
  (vidsim/data/packing.py): row positions of segment k+1's tokens, -1 past its end."""
  r, k, m = slot_tokens.shape
  slot = jnp.maximum(segment_ids - 1, 0)
  start = jnp.take_along_axis(slot_tokens[:, :, 0], slot, axis=1)
  offset = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None] - start
  back = jnp.where(segment_ids > 0, slot * m + offset, 0)
  return slot_tokens, jnp.clip(back, 0, k * m - 1).astype(jnp.int32)


# ------------------------------------------------------------------ MLP


class Mlp(nnx.Module):
  """GELU (hidden = ratio * width) or SwiGLU (hidden = 2/3 of that, rounded up
  to a multiple of 8, so both have about the same parameters and FLOPs)."""

  def __init__(self, width, ratio, kind, *, dtype, rngs):
    if kind not in ("gelu", "swiglu"):
      raise UsageError(f"dit.mlp {kind!r} is not one of ['gelu', 'swiglu']")
    self.kind = kind
    self.hidden = mlp_hidden(width, ratio, kind)
    branches = 2 if kind == "swiglu" else 1
    self.wi = nnx.Einsum(
        "rld,dnf->rlnf", (width, branches, self.hidden), (branches, self.hidden), dtype=dtype,
        kernel_init=partitioned(xavier, "embed", None, "mlp"),
        bias_init=partitioned(zeros, None, "mlp"), rngs=rngs,
    )
    self.wo = nnx.Linear(
        self.hidden, width, dtype=dtype,
        kernel_init=partitioned(xavier, "mlp", "embed"), bias_init=partitioned(zeros, "embed"), rngs=rngs,
    )

  def __call__(self, x):
    h = self.wi(x)
    if self.kind == "swiglu":
      h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
    else:
      h = jax.nn.gelu(h[..., 0, :], approximate=True)
    return self.wo(h)


def mlp_hidden(width, ratio, kind):
  hidden = int(round(width * ratio))
  if kind == "swiglu":
    hidden = 8 * math.ceil(2 * hidden / 3 / 8)
  return hidden


# ------------------------------------------------------------------ time


TIME_FREQUENCIES = 256  # Sinusoid features of the diffusion time (DiT / PixArt).


def timestep_features(t, dim=TIME_FREQUENCIES, max_period=10000.0):
  """t in [0, 1] (any shape) -> [..., dim] sinusoids of 1000 t (the DiT scale)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nnx.Module):
  """Sinusoids -> Linear -> SiLU -> Linear: the per-token time vector."""

  def __init__(self, width, *, dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.fc1 = nnx.Linear(
        TIME_FREQUENCIES, width, dtype=dtype,
        kernel_init=partitioned(init, None, "embed"), bias_init=partitioned(zeros, "embed"), rngs=rngs,
    )
    self.fc2 = nnx.Linear(
        width, width, dtype=dtype,
        kernel_init=partitioned(init, "mlp", "embed"), bias_init=partitioned(zeros, "embed"), rngs=rngs,
    )

  def __call__(self, t):
    return self.fc2(jax.nn.silu(self.fc1(timestep_features(t))))


# ------------------------------------------------------------------ scanned stacks


def stack_layers(make_layer, depth, rngs):
  """`depth` layers built by make_layer(rngs), params stacked on a leading axis
  named "layers" (so partition specs keep the stacked dimension)."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
  def make(rngs):
    return make_layer(rngs)

  return make(rngs)


def run_layers(layers, x, *shared, remat="none", unroll=1):
  """x -> layer_n(...layer_1(x, *shared)..., *shared) with nnx.scan over the stack.

  remat: none | full | dots (jax.checkpoint policy per layer). unroll: layers per scan
  iteration (jax.lax.scan's unroll; the depth or True: no loop, so XLA sees every layer
  and skips the loop's stacking of residuals and gradients)."""

  def body(carry, layer, *args):
    return layer(carry, *args)

  if remat != "none":
    if remat not in REMAT_POLICIES:
      raise UsageError(f"dit.remat {remat!r} is not one of ['none', {', '.join(map(repr, REMAT_POLICIES))}]")
    body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    if unroll is not True:
      raise UsageError(f"scan unroll {unroll!r}: a positive number of layers, or True (all)")
  scan = nnx.scan(
      body, in_axes=(nnx.Carry, 0) + (None,) * len(shared), out_axes=nnx.Carry, transform_metadata=LAYERS,
      unroll=unroll,
  )
  return scan(x, layers, *shared)
