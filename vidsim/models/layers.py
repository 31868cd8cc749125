"""Transformer pieces shared by the DiT and the byte text encoder.

Attention (fused self-attention and cross-attention, both masked, through our
einsum attention with its own backward or `jax.nn.dot_product_attention`), 3D RoPE
over per-token (t, h, w) positions, QK-norm, GELU / SwiGLU MLPs, the sinusoidal
timestep embedding, adaLN helpers and the scanned layer stack. Every parameter
carries logical axis names (see config.mesh.rules); stacked layers get the extra
leading "layers" axis.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vidsim.errors import UsageError

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
    # Keep matmul outputs without batch dims (the projections) and the einsum
    # attention's output and log-sum-exp (`einsum_attention`); recompute the rest.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    ),
}
# "einsum": our own two-einsum attention (see `einsum_attention`); the others are
# jax.nn.dot_product_attention's implementations.
ATTENTION_IMPLS = {"einsum": "einsum", "xla": "xla", "cudnn": "cudnn", "auto": None}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def partitioned(init, *names):
  """An initialiser whose Param carries these logical axis names."""
  return nnx.with_partitioning(init, names)


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UsageError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def attention_impl(name: str):
  if name not in ATTENTION_IMPLS:
    raise UsageError(f"dit.attention_impl {name!r} is not one of {sorted(ATTENTION_IMPLS)}")
  return ATTENTION_IMPLS[name]


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


def self_attention_mask(segment_ids):
  """[R, L] segment ids -> [R, 1, L, L]: attend within the segment; padding (0)
  attends only to itself, so no query row is empty (an empty row gives NaN)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids > 0)[:, :, None]
  eye = jnp.eye(segment_ids.shape[1], dtype=bool)[None]
  return ((same & real) | eye)[:, None]


def padding_mask(valid):
  """[R, S] valid keys -> [R, 1, S, S] for a self-attention over padded text.
  Every query sees the valid keys, and itself, so an empty caption has no empty row."""
  eye = jnp.eye(valid.shape[1], dtype=bool)[None]
  return (valid[:, None, :] | eye)[:, None]


MASKED = -1e30  # Added to the logits of masked keys: exp underflows to exactly 0.


def attention_bias(mask):
  """Bool mask (True = attend) -> additive fp32 logit bias (0 or MASKED).

  Models turn their masks into biases once, outside the scanned layer stack, so
  each layer adds a bias instead of selecting on its logits (a select's backward
  needs the mask again in every layer); the add is the same math for every
  implementation, and jax.nn.dot_product_attention takes the bias as is.
  """
  return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)


def attend(q, k, v, bias, impl):
  """Attention [R, T, H, D] x [R, S, H, D] -> [R, T, H, D] with an additive logit
  bias broadcastable to [R, H, T, S] (see `attention_bias`)."""
  if impl == "einsum":
    return einsum_attention(q, k, v, bias)
  return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation=impl)


@jax.custom_vjp
def einsum_attention(q, k, v, bias):
  """Softmax attention as two einsums (logits and softmax in fp32) with a
  FlashAttention-style backward (`_einsum_attention_bwd`).

  Why not jax.nn.dot_product_attention(implementation="xla"): on XLA:CPU (jax 0.10.2)
  the same math runs slower through it (attention alone, forward + backward at
  [2, 1024, 8, 64]: 1.8x; a whole DiT bench train step: 5.04 s vs 4.32 s, see
  docs/benchmarks.md "## DiT"), and there is no fused CPU kernel.
  On GPU/TPU pick cudnn or xla/auto instead.
  """
  return _einsum_attention_fwd(q, k, v, bias)[0]


def _logits(q, k, bias):
  scale = q.shape[-1] ** -0.5
  return jnp.einsum("rthd,rshd->rhts", q, k, preferred_element_type=jnp.float32) * scale + bias


def _einsum_attention_fwd(q, k, v, bias):
  """Normalises after the value einsum ([T, D] per head, not [T, S]) and keeps only
  the output and the log-sum-exp for the backward. Their names let the remat policy
  save these two small arrays, so the backward recomputes the logits once instead
  of the whole forward (see REMAT_POLICIES)."""
  logits = _logits(q, k, bias)
  peak = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = unnormalised.sum(-1, keepdims=True)  # [R, H, T, 1]
  out = jnp.einsum("rhts,rshd->rthd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = checkpoint_name((out / jnp.moveaxis(total, 1, 2)).astype(q.dtype), "attention_out")
  lse = checkpoint_name((peak + jnp.log(total))[..., 0], "attention_lse")  # [R, H, T]
  return out, (q, k, v, bias, out, lse)


def _einsum_attention_bwd(residuals, d_out):
  """dLogits = P * (dP - rowsum(dO * O)): the row sum is over [T, D], not over
  [T, S] (FlashAttention's identity), so the backward makes two passes over the
  logits instead of the softmax VJP's three."""
  q, k, v, bias, out, lse = residuals
  probs = jnp.exp(_logits(q, k, bias) - lse[..., None])
  d_v = jnp.einsum("rhts,rthd->rshd", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("rthd,rshd->rhts", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("rthd,rthd->rht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  # The gradient of the unscaled q.k scores: the logits' gradient times the scale.
  d_scores = (probs * (d_probs - delta[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
  d_q = jnp.einsum("rhts,rshd->rthd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("rhts,rthd->rshd", d_scores, q, preferred_element_type=jnp.float32)
  # The bias comes from integer masks: nothing upstream needs its gradient.
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


class SelfAttention(nnx.Module):
  """Fused-qkv multi-head self-attention with optional QK-norm and RoPE."""

  def __init__(self, width, heads, *, qk_norm, dtype, impl, rngs):
    if width % heads:
      raise UsageError(f"width {width} is not divisible by heads {heads}")
    head_dim = width // heads
    self.impl = impl
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

  def __call__(self, x, bias, rope=None):
    """bias: [R, 1, L, L] additive logit bias (`attention_bias`)."""
    q, k, v = jnp.unstack(self.qkv(x), axis=2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return self.out(attend(q, k, v, bias, self.impl))


def cross_attention_bias(mask):
  """Cross-attention mask [R, 1, L, S] -> (bias, has_key [R, L, 1, 1]).

  Query rows with no valid key (padding tokens, a segment whose caption is empty)
  attend to everything and are then zeroed by has_key, instead of a softmax over
  nothing (NaN)."""
  has_key = mask.any(-1, keepdims=True)  # [R, 1, L, 1]
  return attention_bias(mask | ~has_key), has_key[:, 0, :, :, None]


class CrossAttention(nnx.Module):
  """Queries from the image tokens, keys and values from the text tokens."""

  def __init__(self, width, context_width, heads, *, qk_norm, dtype, impl, rngs):
    head_dim = width // heads
    self.impl = impl
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

  def __call__(self, x, context, bias, has_key):
    """bias, has_key: from `cross_attention_bias`."""
    q = self.q(x)
    k, v = jnp.unstack(self.kv(context), axis=2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    out = attend(q, k, v, bias, self.impl) * has_key.astype(q.dtype)
    return self.out(out)


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


def run_layers(layers, x, *shared, remat="none"):
  """x -> layer_n(...layer_1(x, *shared)..., *shared) with nnx.scan over the stack.

  remat: none | full | dots (jax.checkpoint policy per layer)."""

  def body(carry, layer, *args):
    return layer(carry, *args)

  if remat != "none":
    if remat not in REMAT_POLICIES:
      raise UsageError(f"dit.remat {remat!r} is not one of ['none', {', '.join(map(repr, REMAT_POLICIES))}]")
    body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  scan = nnx.scan(
      body, in_axes=(nnx.Carry, 0) + (None,) * len(shared), out_axes=nnx.Carry, transform_metadata=LAYERS
  )
  return scan(x, layers, *shared)
