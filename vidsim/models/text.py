"""Text conditioning behind one interface.

`make_text_encoder(config.text, dtype=, attention_impl=, rngs=)` returns a module with `width` (feature size of
its output) and `__call__(text) -> (embeddings [R, K, S, width], mask [R, K, S])`,
where `text` is the packed batch's text dict:
- config.text.encoder == "bytes": `text_tokens` int [R, K, S] (byte + 1, 0 = pad),
  encoded by a small trainable byte-level transformer (ByteTextEncoder); with
  config.text.units == "words" its output is one vector per word (the mean of the
  word's bytes), so the DiT attends to words.
- config.text.encoder == "precomputed": `text_embeddings` float [R, K, S, E] from
  the cache (`vidsim embed-text`: a frozen T5 / UMT5, vidsim/models/t5.py; or any offline
  encoder), projected to `width`.
Both read `text_mask` bool [R, K, S]. The encoder lives inside the DiT, so the
model has one param tree and one optimizer.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidsim.errors import UsageError
from vidsim.models import layers
from vidsim.models import t5

BYTE_VOCAB = 257  # 256 byte values + 1, id 0 = padding.
TEXT_MLP_RATIO = 4.0
BYTE_UNITS = ("bytes", "words")  # config.text.units of the byte encoder.
SPACE_ID = ord(" ") + 1


def tokenize_bytes(captions, max_length: int):
  """Captions -> (ids int32 [N, S], mask bool [N, S]); id = UTF-8 byte + 1, 0 = pad.

  Captions longer than max_length bytes are cut (possibly inside a character:
  the model sees bytes, so that is harmless)."""
  ids = np.zeros((len(captions), max_length), np.int32)
  for i, caption in enumerate(captions):
    raw = np.frombuffer(caption.encode("utf-8")[:max_length], np.uint8).astype(np.int32) + 1
    ids[i, : raw.size] = raw
  return ids, ids > 0


def detokenize_bytes(ids) -> list:
  """The inverse of tokenize_bytes: ids int [N, S] -> N captions (pad dropped)."""
  ids = np.asarray(ids)
  return [bytes((row[row > 0] - 1).astype(np.uint8)).decode("utf-8", "replace") for row in ids]


def pool_words(x, ids, mask):
  """Byte features x [N, S, C] -> one vector per space-separated word: the mean of its
  bytes' features at position w for the w-th word ([N, S, C], the rest zero), and which
  positions hold a word ([N, S]). Spaces belong to no word; empty words are skipped."""
  s = ids.shape[-1]
  space = ids == SPACE_ID
  word = jnp.cumsum(space, axis=-1)  # The word each byte is in.
  member = (word[..., None] == jnp.arange(s)) & (mask & ~space)[..., None]  # [N, bytes, words]
  counts = member.sum(1)  # [N, S]
  pooled = jnp.einsum("nbw,nbc->nwc", member.astype(x.dtype), x) / jnp.maximum(counts, 1)[..., None].astype(x.dtype)
  # Empty words (a leading or doubled space; pooled to zeros) move behind the real ones.
  order = jnp.argsort(counts == 0, axis=-1, stable=True)
  return jnp.take_along_axis(pooled, order[..., None], axis=1), jnp.take_along_axis(counts > 0, order, axis=1)


def _require(text, key, ndim, encoder):
  if key not in text:
    raise UsageError(
        f"text.encoder={encoder!r} needs batch key {key!r}; the batch has {sorted(text)}"
    )
  value = text[key]
  if value.ndim != ndim:
    raise UsageError(f"batch key {key!r} must have {ndim} dims [R, K, S{', E' if ndim == 4 else ''}], got {value.shape}")
  return value


class TextBlock(nnx.Module):
  """Pre-norm transformer layer over one caption's bytes."""

  def __init__(self, width, heads, *, dtype, impl, rngs):
    self.norm1 = layers.rms_norm(width, dtype, rngs)
    self.attn = layers.SelfAttention(width, heads, qk_norm=True, dtype=dtype, impl=impl, rngs=rngs)
    self.norm2 = layers.rms_norm(width, dtype, rngs)
    self.mlp = layers.Mlp(width, TEXT_MLP_RATIO, "gelu", dtype=dtype, rngs=rngs)

  def __call__(self, x, segment_ids):
    x = x + self.attn(self.norm1(x), segment_ids)
    return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nnx.Module):
  """Byte embeddings + learned positions -> `depth` transformer layers -> RMSNorm."""

  def __init__(self, t, *, dtype, attention_impl, rngs):
    dtype = layers.compute_dtype(dtype)
    impl = layers.attention_impl(attention_impl)
    self.width = t.width
    self.max_length = t.max_length
    self.dtype = dtype
    self.units = t.get("units", "bytes")  # Configs saved before the key existed: bytes.
    if self.units not in BYTE_UNITS:
      raise UsageError(f"text.units={self.units!r}; valid: {', '.join(BYTE_UNITS)}")
    self.embed = nnx.Embed(
        BYTE_VOCAB, t.width, dtype=dtype,
        embedding_init=layers.partitioned(nnx.initializers.normal(0.02), "vocab", "embed"), rngs=rngs,
    )
    self.position = nnx.Param(
        layers.partitioned(nnx.initializers.normal(0.02), "text_length", "embed")(
            rngs.params(), (t.max_length, t.width)
        )
    )
    self.blocks = layers.stack_layers(
        lambda r: TextBlock(t.width, t.heads, dtype=dtype, impl=impl, rngs=r), t.depth, rngs
    )
    self.norm = layers.rms_norm(t.width, dtype, rngs)

  def __call__(self, text):
    ids = _require(text, "text_tokens", 3, "bytes")
    mask = text["text_mask"].astype(bool)
    r, k, s = ids.shape
    if s != self.max_length:
      raise UsageError(f"text_tokens have length {s}, config.text.max_length is {self.max_length}")
    ids, valid = ids.reshape(r * k, s), mask.reshape(r * k, s)
    x = self.embed(ids) + self.position[...].astype(self.dtype)
    # Valid text positions are segment 1, padding 0 (which outputs 0 and is masked
    # out of the DiT's cross-attention keys anyway).
    x = self.norm(layers.run_layers(self.blocks, x, valid.astype(jnp.int32)))
    if self.units == "words":
      x, valid = pool_words(x, ids, valid)
    return x.reshape(r, k, s, self.width), valid.reshape(r, k, s)


class PrecomputedText(nnx.Module):
  """A linear projection of embeddings computed offline (read from the cache)."""

  def __init__(self, t, *, dtype, attention_impl, rngs):
    del attention_impl  # A projection: nothing attends.
    if t.get("units", "bytes") != "bytes":
      raise UsageError(f"text.units={t.units!r} pools the byte encoder's bytes into words; text.encoder='precomputed' "
                       "keeps its encoder's own tokens: leave text.units='bytes'")
    # The size of the encoder's output: set, or the d_model of the text.t5_path encoder.
    embed_dim = t.embed_dim or (t5.read_config(t.t5_path).d_model if t.t5_path else 0)
    if embed_dim <= 0:
      raise UsageError(
          "text.encoder='precomputed' needs text.embed_dim (the cached embedding size); "
          "set --config.text.embed_dim=E or text.t5_path (the train loop reads E from the latent cache)"
      )
    self.width = t.width
    self.embed_dim = embed_dim
    self.proj = nnx.Linear(
        embed_dim, t.width, dtype=layers.compute_dtype(dtype),
        kernel_init=layers.partitioned(layers.xavier, None, "embed"),
        bias_init=layers.partitioned(layers.zeros, "embed"), rngs=rngs,
    )
    self.norm = layers.rms_norm(t.width, layers.compute_dtype(dtype), rngs)

  def __call__(self, text):
    emb = _require(text, "text_embeddings", 4, "precomputed")
    if emb.shape[-1] != self.embed_dim:
      raise UsageError(f"text_embeddings have size {emb.shape[-1]}, config.text.embed_dim is {self.embed_dim}")
    return self.norm(self.proj(emb)), text["text_mask"].astype(bool)


ENCODERS = {"bytes": ByteTextEncoder, "precomputed": PrecomputedText}


def make_text_encoder(text, *, dtype, attention_impl, rngs):
  """The encoder config.text names; `dtype` and `attention_impl` are the DiT's."""
  if text.encoder not in ENCODERS:
    raise UsageError(f"text.encoder {text.encoder!r} is not one of {sorted(ENCODERS)}")
  return ENCODERS[text.encoder](text, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
