"""The diffusion transformer over packed spacetime patches (rectified flow, v = eps - x0).

Call: model(x_t [R, L, P], t [R, L], positions [R, L, 3], segment_ids [R, L],
text {text_tokens | text_embeddings, text_mask [R, K, S]}, drop_text [R, K]) -> v [R, L, P].

- Attention takes segment ids, never a dense mask (vidsim.models.attention.attend:
  einsum / xla / cudnn / splash backends, context parallelism over the mesh axis of
  "length" by dit.context_parallel).
- Self-attention stays inside a segment (segment_ids; 0 = padding) with 3D RoPE over
  each token's own (t, h, w) position, so a packed row computes exactly what each
  sample would alone. dit.position_embedding = "sincos" also adds fixed sin/cos
  features of the (t, h, w) index to the patch embeddings: RoPE alone gives only
  relative offsets, so a token cannot tell it is at the left of the frame.
- Cross-attention: every token sees only the caption of its own segment (text of
  slot k belongs to segment k + 1; the K captions are flattened to K*S keys whose
  segment id is k + 1 where the text is valid, else 0). Given `slot_tokens` (the packer
  adds it when samples are at most half a row, vidsim/data/packing.py), the general path
  instead gathers each slot's queries and attends them to that slot's S keys alone:
  the same v, without scoring every token against the K - 1 other captions (on the
  einsum / xla / cudnn backends, when the length is not split over the mesh).
- Time is per token (clean conditioning tokens have t = 0). Modulation is
  adaLN-single (PixArt-alpha): one timestep MLP gives 6 * width per token, shared
  by every block, plus a learned per-block (6, width) table. A per-block adaLN
  linear would cost 6 width^2 per token per block, +43% on a block's 14 width^2.
- Caption dropout: where drop_text[r, k], segment k+1 sees a learned null caption
  (all S positions valid) instead: the unconditional branch of CFG.
- Aligned rows (dit.segment_blocks = n > 1): when every row of the batch splits into n
  equal blocks that each hold at most one segment (`segments_in_blocks`, checked on the
  device), the rows run as R*n rows of L/n tokens, each reading and encoding only its own
  segment's caption: the same v for every token, without the attention pairs across
  segments (masked out anyway) or the unused caption slots. Other batches take the
  general path (a cond; both are compiled). Training puts that cond around the whole
  gradient rather than inside it: differentiating through a cond makes each branch
  output the other's residuals as zeros, whole stacks of them a step.
- Blocks are stacked with nnx.scan (params have a leading "layers" axis), with a
  configurable remat policy; activations are constrained at block boundaries.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.models import attention, layers
from vidsim.models.text import make_text_encoder

MODULATIONS = 6  # shift, scale, gate for attention; the same for the MLP.
POSITION_EMBEDDINGS = ("none", "sincos")  # dit.position_embedding: added to the patch embeddings.


def patch_features(config) -> int:
  """P: latent features per patch token."""
  return math.prod(config.dit.patch_size) * config.vae.latent_channels


class DiTBlock(nnx.Module):
  """adaLN-Zero self-attention, cross-attention to the own caption, MLP."""

  def __init__(self, d, context_width, *, rngs):
    dtype = layers.compute_dtype(d.dtype)
    impl = layers.attention_impl(d.attention_impl)
    parallel = dict(context_parallel=d.context_parallel, block_sizes=dict(d.attention_block_sizes))
    self.dtype = dtype
    # Added to the shared per-token modulation; zeros + the zero-init timestep
    # projection make gates 0 at init, so the block starts as the identity.
    self.modulation = nnx.Param(
        layers.partitioned(layers.zeros, None, "embed")(rngs.params(), (MODULATIONS, d.width))
    )
    self.attn = layers.SelfAttention(
        d.width, d.heads, qk_norm=d.qk_norm, dtype=dtype, impl=impl, rngs=rngs, **parallel
    )
    self.cross = layers.CrossAttention(
        d.width, context_width, d.heads, qk_norm=d.qk_norm, dtype=dtype, impl=impl, rngs=rngs, **parallel
    )
    self.mlp = layers.Mlp(d.width, d.mlp_ratio, d.mlp, dtype=dtype, rngs=rngs)

  def __call__(self, x, time_mod, rope, segment_ids, context, context_segment_ids, slots=None):
    mod = time_mod + self.modulation[...].astype(time_mod.dtype)  # [R, L, 6, W]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.unstack(mod, axis=2)
    x = x + gate1 * self.attn(layers.modulate(layers.layer_norm(x), shift1, scale1), segment_ids, rope)
    x = x + self.cross(layers.layer_norm(x), context, segment_ids, context_segment_ids, slots)
    x = x + gate2 * self.mlp(layers.modulate(layers.layer_norm(x), shift2, scale2))
    return mesh_lib.constrain(x, "batch", "length", "embed")


class DiT(nnx.Module):
  """Text-conditioned DiT over packed patch tokens; see the module docstring."""

  def __init__(self, dit, text, latent_channels: int, *, rngs):
    """dit, text: the config sections of the same names; latent_channels: the VAE's."""
    # Params are placed by their logical names when built under
    # vidsim.mesh.activate(mesh, config); without a mesh they stay unsharded.
    with nnx.use_eager_sharding(nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty):
      self._build(dit, text, latent_channels, rngs)

  def _build(self, d, text, latent_channels, rngs):
    self.dtype = layers.compute_dtype(d.dtype)
    self.remat = d.remat
    self.scan_unroll = d.get("scan_unroll", 1)  # Configs saved before the key existed: 1.
    self.rope_theta = d.rope_theta
    self.per_slot = per_slot_enabled(d)
    if d.position_embedding not in POSITION_EMBEDDINGS:
      raise UsageError(f"dit.position_embedding={d.position_embedding!r}; valid: {', '.join(POSITION_EMBEDDINGS)}")
    self.position_embedding = d.position_embedding
    blocks = d.get("segment_blocks", 0)  # Configs saved before the key existed.
    if blocks < 0:
      raise UsageError(f"dit.segment_blocks={blocks}; use 0 (off) or the blocks per row")
    self.segment_blocks = int(blocks)
    self.head_dim = d.width // d.heads
    layers.rope_pairs(self.head_dim)  # Fails early on a head too small for 3D RoPE.
    self.patch_dim = math.prod(d.patch_size) * latent_channels
    self.text = make_text_encoder(text, dtype=d.dtype, attention_impl=d.attention_impl, rngs=rngs)
    ctx = self.text.width
    self.null_text = nnx.Param(
        layers.partitioned(nnx.initializers.normal(ctx**-0.5), "text_length", "embed")(
            rngs.params(), (text.max_length, ctx)
        )
    )
    self.patch_embed = nnx.Linear(
        self.patch_dim, d.width, dtype=self.dtype,
        kernel_init=layers.partitioned(layers.xavier, None, "embed"),
        bias_init=layers.partitioned(layers.zeros, "embed"), rngs=rngs,
    )
    self.time_embed = layers.TimestepEmbedding(d.width, dtype=self.dtype, rngs=rngs)
    self.time_modulation = nnx.Linear(
        d.width, MODULATIONS * d.width, dtype=self.dtype,
        kernel_init=layers.partitioned(layers.zeros, "embed", "mlp"),
        bias_init=layers.partitioned(layers.zeros, "mlp"), rngs=rngs,
    )
    self.blocks = layers.stack_layers(lambda r: DiTBlock(d, ctx, rngs=r), d.depth, rngs)
    self.final_modulation = nnx.Param(
        layers.partitioned(nnx.initializers.normal(d.width**-0.5), None, "embed")(rngs.params(), (2, d.width))
    )
    self.final = nnx.Linear(
        d.width, self.patch_dim, dtype=self.dtype,
        kernel_init=layers.partitioned(layers.zeros, "embed", None),
        bias_init=layers.partitioned(layers.zeros, None), rngs=rngs,
    )

  def encode_text(self, text, drop_text):
    """Captions [R, K, S] -> context [R, K, S, C] and its valid positions [R, K, S]; a
    slot with drop_text[r, k] gets the null caption, all S positions valid."""
    context, mask = self.text(text)
    r, k = context.shape[:2]
    if drop_text.shape != (r, k):
      raise UsageError(f"drop_text has shape {drop_text.shape}, expected [R, K] = {(r, k)}")
    drop = drop_text.astype(bool)
    context = jnp.where(drop[:, :, None, None], self.null_text[...].astype(context.dtype), context)
    return context, mask | drop[:, :, None]

  def __call__(self, x_t, t, positions, segment_ids, text, drop_text, path="auto", slot_tokens=None):
    """v for every token. `path`: "auto" picks the blocked path on the device where
    `segments_in_blocks` holds; "dense" / "blocked" force one (the train step picks it
    outside the gradient: see `vidsim.train.dit_step`). `slot_tokens` [R, K, M]: the
    packed batch's, for the general path's per-slot cross-attention (module docstring)."""
    r, l, p = x_t.shape
    if p != self.patch_dim:
      raise UsageError(
          f"tokens have {p} features, the model expects prod(dit.patch_size) * vae.latent_channels = {self.patch_dim}"
      )
    if path not in ("auto", "dense", "blocked"):
      raise ValueError(f"path={path!r}; valid: auto, dense, blocked")
    segment_ids = segment_ids.astype(jnp.int32)
    args = (x_t, t, positions, segment_ids, text, drop_text)
    n = self.segment_blocks
    dense = lambda model, *a: model._dense(*a, slot_tokens=slot_tokens)
    if path == "dense" or not blocked_path_possible(n, l):
      return dense(self, *args)
    if path == "blocked":
      return self._blocked(n, *args)
    # Both paths compute the same v for every token; the blocked one skips the
    # cross-block attention pairs and the captions no block uses.
    aligned = segments_in_blocks(segment_ids, n, drop_text.shape[1])
    # nnx.cond, not jax.lax.cond: the branches run the nnx.scan'd blocks of `model`.
    return nnx.cond(aligned, lambda model, *a: model._blocked(n, *a), dense, self, *args)

  def _dense(self, x_t, t, positions, segment_ids, text, drop_text, slot_tokens=None):
    """The general path: every row attends over its whole length (masked by segment);
    cross-attention runs per caption slot where `slot_tokens` is given and
    `per_slot_cross_attention` allows, else every token's keys are all K caption slots
    (masked to its own)."""
    context, mask = self.encode_text(text, drop_text)
    r, k, s, c = context.shape
    slot_ids = jnp.arange(1, k + 1, dtype=jnp.int32)[None, :, None]
    key_segments = jnp.where(mask, slot_ids, 0)
    if slot_tokens is not None and self.per_slot_cross_attention():
      slots = layers.caption_slots(segment_ids, slot_tokens.astype(jnp.int32))
      return self._body(x_t, t, positions, segment_ids, context, key_segments, slots)
    return self._body(x_t, t, positions, segment_ids, context.reshape(r, k * s, c), key_segments.reshape(r, k * s))

  def per_slot_cross_attention(self) -> bool:
    """`per_slot_enabled`, and the row's length not split over the ambient mesh (the
    gathers of queries along the row would cross shards)."""
    return self.per_slot and not attention.length_is_split()

  def _blocked(self, n, x_t, t, positions, segment_ids, text, drop_text):
    """Rows of n aligned blocks (segments_in_blocks holds) run as R*n rows of L/n tokens:
    attention pairs across blocks, which the segment mask zeroes anyway, are never
    formed, and each block reads and encodes only its own segment's caption."""
    r, l, p = x_t.shape
    b = l // n
    block_ids = segment_ids.reshape(r, n, b).max(-1)  # [R, n]: the block's segment, 0 if empty.
    slot = jnp.clip(block_ids - 1, 0, drop_text.shape[1] - 1)
    take = lambda a: jnp.take_along_axis(a, slot.reshape((r, n) + (1,) * (a.ndim - 2)), axis=1)
    context, mask = self.encode_text({key: take(v) for key, v in text.items()}, take(drop_text))
    s, c = context.shape[2:]
    key_segments = jnp.where(mask, block_ids[:, :, None], 0).reshape(r * n, s)
    rows = lambda a: a.reshape((r * n, b) + a.shape[2:])
    v = self._body(rows(x_t), rows(t), rows(positions), rows(segment_ids), context.reshape(r * n, s, c), key_segments)
    return v.reshape(r, l, p)

  def _body(self, x_t, t, positions, segment_ids, context, key_segments, slots=None):
    r, l, _ = x_t.shape
    rope = layers.rope_angles(positions, self.head_dim, self.rope_theta)
    x = self.patch_embed(x_t.astype(self.dtype))
    if self.position_embedding == "sincos":
      x = x + layers.sincos_position_embedding(positions, x.shape[-1]).astype(x.dtype)
    x = mesh_lib.constrain(x, "batch", "length", "embed")
    time = self.time_embed(t)  # [R, L, W]
    time_mod = self.time_modulation(jax.nn.silu(time)).reshape(r, l, MODULATIONS, -1)
    x = layers.run_layers(
        self.blocks, x, time_mod, rope, segment_ids, context, key_segments, slots, remat=self.remat,
        unroll=self.scan_unroll,
    )
    shift, scale = jnp.unstack(self.final_modulation[...].astype(time.dtype) + time[:, :, None], axis=2)
    v = self.final(layers.modulate(layers.layer_norm(x), shift, scale))
    return v.astype(jnp.float32)


def per_slot_enabled(d) -> bool:
  """dit.per_slot_cross_attention (configs saved before the key existed: on), except for
  the splash kernel (TPU tiles of 128)."""
  return bool(d.get("per_slot_cross_attention", True)) and attention.resolve_impl(d.attention_impl) != "splash"


def blocked_path_possible(segment_blocks: int, row_tokens: int) -> bool:
  """Whether rows of this length can take the blocked path at all (dit.segment_blocks)."""
  return segment_blocks > 1 and row_tokens % segment_blocks == 0


def segments_in_blocks(segment_ids, n: int, slots: int):
  """bool scalar: every row of segment_ids [R, L] splits into n blocks of L/n tokens that
  each hold at most one segment id > 0, no id occurs in two blocks of a row, and every
  id has a caption slot (id <= slots). Then attention within blocks is the same as
  attention within segments. Host arrays (numpy) are checked with numpy, so the FLOP
  count of a batch needs no device."""
  xp = jnp if isinstance(segment_ids, jax.Array) else np
  r, l = segment_ids.shape
  ids = segment_ids.reshape(r, n, l // n)
  top = ids.max(-1)
  low = xp.where(ids > 0, ids, np.iinfo(np.int32).max).min(-1)
  one_each = (top == 0) | (low == top)
  ordered = xp.sort(top, axis=-1)
  repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] > 0)
  return one_each.all() & ~repeated.any() & (top <= slots).all() & (ids.min() >= 0)
