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
  segment id is k + 1 where the text is valid, else 0).
- Time is per token (clean conditioning tokens have t = 0). Modulation is
  adaLN-single (PixArt-alpha): one timestep MLP gives 6 * width per token, shared
  by every block, plus a learned per-block (6, width) table. A per-block adaLN
  linear would cost 6 width^2 per token per block, +43% on a block's 14 width^2.
- Caption dropout: where drop_text[r, k], segment k+1 sees a learned null caption
  (all S positions valid) instead: the unconditional branch of CFG.
- Blocks are stacked with nnx.scan (params have a leading "layers" axis), with a
  configurable remat policy; activations are constrained at block boundaries.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.models import layers
from vidsim.models.text import make_text_encoder

MODULATIONS = 6  # shift, scale, gate for attention; the same for the MLP.
POSITION_EMBEDDINGS = ("none", "sincos")  # dit.position_embedding: added to the patch embeddings.


def patch_features(config) -> int:
  """P: latent features per patch token."""
  return math.prod(config.dit.patch_size) * config.vae.latent_channels


class DiTBlock(nnx.Module):
  """adaLN-Zero self-attention, cross-attention to the own caption, MLP."""

  def __init__(self, config, context_width, *, rngs):
    d = config.dit
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

  def __call__(self, x, time_mod, rope, segment_ids, context, context_segment_ids):
    mod = time_mod + self.modulation[...].astype(time_mod.dtype)  # [R, L, 6, W]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.unstack(mod, axis=2)
    x = x + gate1 * self.attn(layers.modulate(layers.layer_norm(x), shift1, scale1), segment_ids, rope)
    x = x + self.cross(layers.layer_norm(x), context, segment_ids, context_segment_ids)
    x = x + gate2 * self.mlp(layers.modulate(layers.layer_norm(x), shift2, scale2))
    return mesh_lib.constrain(x, "batch", "length", "embed")


class DiT(nnx.Module):
  """Text-conditioned DiT over packed patch tokens; see the module docstring."""

  def __init__(self, config, *, rngs):
    # Params are placed by their logical names when built under
    # vidsim.mesh.activate(mesh, config); without a mesh they stay unsharded.
    with nnx.use_eager_sharding(nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty):
      self._build(config, rngs)

  def _build(self, config, rngs):
    d = config.dit
    self.dtype = layers.compute_dtype(d.dtype)
    self.remat = d.remat
    self.rope_theta = d.rope_theta
    if d.position_embedding not in POSITION_EMBEDDINGS:
      raise UsageError(f"dit.position_embedding={d.position_embedding!r}; valid: {', '.join(POSITION_EMBEDDINGS)}")
    self.position_embedding = d.position_embedding
    self.head_dim = d.width // d.heads
    layers.rope_pairs(self.head_dim)  # Fails early on a head too small for 3D RoPE.
    self.patch_dim = patch_features(config)
    self.text = make_text_encoder(config, rngs=rngs)
    ctx = self.text.width
    self.null_text = nnx.Param(
        layers.partitioned(nnx.initializers.normal(ctx**-0.5), "text_length", "embed")(
            rngs.params(), (config.text.max_length, ctx)
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
    self.blocks = layers.stack_layers(lambda r: DiTBlock(config, ctx, rngs=r), d.depth, rngs)
    self.final_modulation = nnx.Param(
        layers.partitioned(nnx.initializers.normal(d.width**-0.5), None, "embed")(rngs.params(), (2, d.width))
    )
    self.final = nnx.Linear(
        d.width, self.patch_dim, dtype=self.dtype,
        kernel_init=layers.partitioned(layers.zeros, "embed", None),
        bias_init=layers.partitioned(layers.zeros, None), rngs=rngs,
    )

  def encode_text(self, text, drop_text):
    """Captions -> context [R, K*S, C] and its key segment ids [R, K*S]: k + 1 for a
    valid position of caption slot k, 0 for a masked one."""
    context, mask = self.text(text)
    r, k, s, c = context.shape
    if drop_text.shape != (r, k):
      raise UsageError(f"drop_text has shape {drop_text.shape}, expected [R, K] = {(r, k)}")
    drop = drop_text.astype(bool)
    context = jnp.where(drop[:, :, None, None], self.null_text[...].astype(context.dtype), context)
    mask = mask | drop[:, :, None]
    slots = jnp.arange(1, k + 1, dtype=jnp.int32)[None, :, None]
    key_segments = jnp.where(mask, slots, 0).reshape(r, k * s)
    return context.reshape(r, k * s, c), key_segments

  def __call__(self, x_t, t, positions, segment_ids, text, drop_text):
    r, l, p = x_t.shape
    if p != self.patch_dim:
      raise UsageError(
          f"tokens have {p} features, the model expects prod(dit.patch_size) * vae.latent_channels = {self.patch_dim}"
      )
    segment_ids = segment_ids.astype(jnp.int32)
    context, key_segments = self.encode_text(text, drop_text)
    rope = layers.rope_angles(positions, self.head_dim, self.rope_theta)

    x = self.patch_embed(x_t.astype(self.dtype))
    if self.position_embedding == "sincos":
      x = x + layers.sincos_position_embedding(positions, x.shape[-1]).astype(x.dtype)
    x = mesh_lib.constrain(x, "batch", "length", "embed")
    time = self.time_embed(t)  # [R, L, W]
    time_mod = self.time_modulation(jax.nn.silu(time)).reshape(r, l, MODULATIONS, -1)
    x = layers.run_layers(
        self.blocks, x, time_mod, rope, segment_ids, context, key_segments, remat=self.remat
    )
    shift, scale = jnp.unstack(self.final_modulation[...].astype(time.dtype) + time[:, :, None], axis=2)
    v = self.final(layers.modulate(layers.layer_norm(x), shift, scale))
    return v.astype(jnp.float32)
