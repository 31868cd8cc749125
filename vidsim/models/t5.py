"""T5 and UMT5 text encoders (encoder stack only) in Flax NNX, frozen, for caption embeddings.

The architecture is the one of Hugging Face transformers' T5EncoderModel / UMT5EncoderModel,
so their checkpoints load tensor by tensor (vidsim/models/t5_loader.py):
- token embeddings (no scaling), then `num_layers` pre-norm blocks of self-attention and a
  feed-forward net, then a final RMS norm;
- RMS layer norm without mean subtraction or bias (T5LayerNorm), variance in float32;
- attention without biases and WITHOUT the 1/sqrt(d_kv) scaling (T5 folds it into the
  initialisation of q), plus a learned bias per (relative-position bucket, head):
  T5 / mT5 learn one table in layer 0 and every layer reuses it; UMT5 learns one per layer;
- feed-forward: ReLU (original T5: wi, wo) or gated (v1.1, mT5, UMT5: act(wi_0 x) * wi_1 x,
  act = tanh-approximated GELU for "gated-gelu"), no biases.

Attention is written out here instead of going through vidsim.models.attention.attend: T5 adds a
dense [heads, S, S] relative-position bias to the scores, which attend (segment ids only, by
design: no dense mask for video rows) does not take. Captions are short (S <= a few hundred), so
the square is small.

Params carry logical axis names (config.mesh.rules), with the layer stack on a leading "layers"
axis, so an encoder too large for one device is sharded over the mesh like the DiT.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vidsim.errors import UsageError
from vidsim.models import layers

MODEL_TYPES = ("t5", "mt5", "umt5")  # config.json model_type values this encoder reads.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # transformers' NewGELU: the tanh form.
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
# Scores of masked (padding) keys: far below any real score, but finite, so a row with no
# valid key (a padding row of a batch) gives a uniform softmax instead of NaNs.
MASKED_SCORE = -1e30


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's shape, read from a Hugging Face config.json (`read_config`)."""

  model_type: str
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_buckets: int
  max_distance: int
  gated: bool
  activation: str
  eps: float

  @property
  def per_layer_bias(self) -> bool:
    """UMT5 learns a relative-position table in every layer; T5 and mT5 share layer 0's."""
    return self.model_type == "umt5"


def parse_config(raw: dict, where: str = "config.json") -> T5Config:
  """A T5Config from the dict of a Hugging Face T5 / mT5 / UMT5 config.json."""
  model_type = raw.get("model_type", "")
  if model_type not in MODEL_TYPES:
    raise UsageError(f"{where}: model_type {model_type!r} is not a T5 encoder; supported: {', '.join(MODEL_TYPES)}")
  missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in raw]
  if missing:
    raise UsageError(f"{where}: missing keys {missing}")
  # transformers' rule: "gated-gelu" means gated with the tanh GELU ("gelu_new"); otherwise the
  # activation is the last word of feed_forward_proj and "gated-" marks the gated form.
  proj = raw.get("feed_forward_proj", "relu")
  words = proj.split("-")
  gated = words[0] == "gated"
  if len(words) > 2 or (len(words) == 2 and not gated):
    raise UsageError(f"{where}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
  activation = "gelu_new" if proj == "gated-gelu" else words[-1]
  if activation not in ACTIVATIONS:
    raise UsageError(f"{where}: activation {activation!r} of feed_forward_proj {proj!r}; supported: {sorted(ACTIVATIONS)}")
  return T5Config(
      model_type=model_type, vocab_size=int(raw["vocab_size"]), d_model=int(raw["d_model"]), d_kv=int(raw["d_kv"]),
      d_ff=int(raw["d_ff"]), num_layers=int(raw["num_layers"]), num_heads=int(raw["num_heads"]),
      num_buckets=int(raw.get("relative_attention_num_buckets", 32)),
      max_distance=int(raw.get("relative_attention_max_distance", 128)),
      gated=gated, activation=activation, eps=float(raw.get("layer_norm_epsilon", 1e-6)),
  )


def read_config(directory) -> T5Config:
  """The T5Config of a Hugging Face model directory (its config.json)."""
  path = epath.Path(directory) / "config.json"
  if not path.exists():
    raise UsageError(f"{directory} has no config.json (a Hugging Face T5/UMT5 model directory holds one)")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UsageError(f"{path} is not valid JSON: {e}") from e
  return parse_config(raw, str(path))


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [S, S]: the bucket of key position j seen from query position i (encoder:
  bidirectional). Half the buckets for each sign; exact offsets below num_buckets / 4, then
  logarithmic up to max_distance, the last bucket beyond. The same arithmetic as
  transformers' T5Attention._relative_position_bucket (float32 log, truncation to int)."""
  position = np.arange(length, dtype=np.int64)
  relative = position[None, :] - position[:, None]  # key - query
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  relative = np.abs(relative)
  max_exact = half // 2
  is_small = relative < max_exact
  with np.errstate(divide="ignore"):  # log(0) in the small branch, which np.where discards.
    scaled = (np.log(relative.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, relative, large)).astype(np.int32)


def _param(rngs, shape, dtype, *names):
  # Placeholder values: the weights always come from a checkpoint (t5_loader), the
  # initialiser only gives the shapes, dtypes and logical names.
  return nnx.Param(layers.partitioned(nnx.initializers.normal(0.02), *names)(rngs.params(), shape, dtype))


class T5LayerNorm(nnx.Module):
  """y = weight * x / sqrt(mean(x^2) + eps), the mean in float32; no bias, no centring."""

  def __init__(self, features, eps, *, dtype, rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(layers.partitioned(layers.ones, "norm")(jax.random.key(0), (features,), dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(jnp.float32) * y


class T5Block(nnx.Module):
  """Self-attention (with the scores' additive bias given) and the feed-forward net, pre-norm."""

  def __init__(self, c: T5Config, *, dtype, rngs):
    self.c, self.dtype = c, dtype
    d, h, k, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
    self.attn_norm = T5LayerNorm(d, c.eps, dtype=dtype, rngs=rngs)
    self.q = _param(rngs, (d, h, k), dtype, "embed", "heads", "kv")
    self.k = _param(rngs, (d, h, k), dtype, "embed", "heads", "kv")
    self.v = _param(rngs, (d, h, k), dtype, "embed", "heads", "kv")
    self.o = _param(rngs, (h, k, d), dtype, "heads", "kv", "embed")
    if c.per_layer_bias:
      self.relative_bias = _param(rngs, (c.num_buckets, h), dtype, None, "heads")
    self.ff_norm = T5LayerNorm(d, c.eps, dtype=dtype, rngs=rngs)
    if c.gated:
      self.wi_0 = _param(rngs, (d, f), dtype, "embed", "mlp")
      self.wi_1 = _param(rngs, (d, f), dtype, "embed", "mlp")
    else:
      self.wi = _param(rngs, (d, f), dtype, "embed", "mlp")
    self.wo = _param(rngs, (f, d), dtype, "mlp", "embed")

  def __call__(self, x, bias, buckets):
    """x float32 [N, S, D] (the residual stream stays float32); bias float32 [N, H, S, S]
    (padding mask, plus layer 0's position bias for T5); buckets int [S, S]."""
    if self.c.per_layer_bias:
      bias = bias + jnp.transpose(self.relative_bias[...].astype(jnp.float32)[buckets], (2, 0, 1))[None]
    y = self.attn_norm(x).astype(self.dtype)
    q = jnp.einsum("nsd,dhk->nshk", y, self.q[...])
    key = jnp.einsum("nsd,dhk->nshk", y, self.k[...])
    value = jnp.einsum("nsd,dhk->nshk", y, self.v[...])
    scores = jnp.einsum("nqhk,nshk->nhqs", q, key, preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqs,nshk->nqhk", weights, value)
    x = x + jnp.einsum("nqhk,hkd->nqd", out, self.o[...], preferred_element_type=jnp.float32)
    y = self.ff_norm(x).astype(self.dtype)
    act = ACTIVATIONS[self.c.activation]
    if self.c.gated:
      hidden = act(y @ self.wi_0[...]) * (y @ self.wi_1[...])
    else:
      hidden = act(y @ self.wi[...])
    return x + jnp.matmul(hidden, self.wo[...], preferred_element_type=jnp.float32)


class T5Encoder(nnx.Module):
  """ids int [N, S], mask bool [N, S] -> last hidden states float32 [N, S, d_model] (0 at padding).

  dtype: params and matmuls (float32 | bfloat16); norms, softmax and the residual stream are float32."""

  def __init__(self, c: T5Config, *, dtype="float32", rngs):
    with nnx.use_eager_sharding(nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty):
      self.c = c
      self.dtype = layers.compute_dtype(dtype)
      self.embed = _param(rngs, (c.vocab_size, c.d_model), self.dtype, "vocab", "embed")
      if not c.per_layer_bias:
        self.relative_bias = _param(rngs, (c.num_buckets, c.num_heads), self.dtype, None, "heads")
      self.blocks = layers.stack_layers(lambda r: T5Block(c, dtype=self.dtype, rngs=r), c.num_layers, rngs)
      self.final_norm = T5LayerNorm(c.d_model, c.eps, dtype=self.dtype, rngs=rngs)

  @property
  def width(self) -> int:
    return self.c.d_model

  def __call__(self, ids, mask):
    n, s = ids.shape
    mask = mask.astype(bool)
    buckets = jnp.asarray(relative_position_buckets(s, self.c.num_buckets, self.c.max_distance))
    bias = jnp.where(mask[:, None, None, :], 0.0, MASKED_SCORE).astype(jnp.float32)  # [N, 1, 1, S]
    bias = jnp.broadcast_to(bias, (n, self.c.num_heads, s, s))
    if not self.c.per_layer_bias:
      bias = bias + jnp.transpose(self.relative_bias[...].astype(jnp.float32)[buckets], (2, 0, 1))[None]
    x = jnp.take(self.embed[...], ids, axis=0).astype(jnp.float32)
    x = layers.run_layers(self.blocks, x, bias, buckets)
    return jnp.where(mask[..., None], self.final_norm(x), 0.0)


def encoder_flops(c: T5Config, captions: int, length: int) -> int:
  """Forward model FLOPs of encoding `captions` captions of `length` tokens (padding included:
  it is computed). Counted as in vidsim/models/flops.py: 2 x weights x tokens, plus the two
  attention matmuls (2 x 2 x S x S x heads x d_kv per caption); the embedding is a gather."""
  tokens = captions * length
  inner = c.num_heads * c.d_kv
  ff = (3 if c.gated else 2) * c.d_model * c.d_ff
  per_layer = 2 * (4 * c.d_model * inner + ff) * tokens + 2 * 2 * captions * length * length * inner
  return c.num_layers * per_layer
