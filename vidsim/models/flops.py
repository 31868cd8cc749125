"""Model FLOPs of a DiT train step and its parameter count.

Counting rule (the one MFU is quoted against):
- Every weight matrix: 2 x its size x the number of tokens it is applied to,
  forward. Image-side weights (the timestep MLP and adaLN-single projection too:
  time is per token) see image tokens, text-side weights see text tokens. Biases,
  norms, elementwise ops and the byte embedding lookup (a gather) are not counted.
- Attention: 2 matmuls (scores, values) x 2 x query-key pairs x width, forward.
- A train step is 3 x forward (backward = 2 x forward). Rematerialisation is not
  counted (model FLOPs, not hardware FLOPs).

What is counted is a `Work`, of which a step has two:
- useful (`batch_work(..., "useful")`, what MFU is quoted against): real tokens only,
  self-attention pairs within each segment (sum of its length squared), the captions of
  the segments a row holds (all S bytes each, as a padded batch of captions would), each
  real token against its own caption's S keys. The same count for a packed batch and
  for its samples run one by one.
- executed (`batch_work(..., "executed")`): what the step computes: every token of a
  row, the whole L x L square of a row (or n blocks of (L/n)^2 where
  dit.segment_blocks = n applies), all K caption slots of a row against every token (or
  one caption per block, or, where the batch has `slot_tokens` [R, K, M], each slot's M
  query places against its own caption).
"""

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from vidsim.models import layers
from vidsim.models import t5
from vidsim.models.dit import MODULATIONS, DiT, patch_features, per_slot_enabled, segments_in_blocks
from vidsim.models.text import TEXT_MLP_RATIO


@dataclasses.dataclass(frozen=True)
class Work:
  """What a step's matmuls are applied to, summed over its rows."""

  image_tokens: int  # Tokens the image-side weights see.
  self_pairs: int  # Self-attention (query, key) pairs.
  captions: int  # Captions through the text encoder (each config.text.max_length long).
  cross_pairs: int  # Cross-attention (image query, text key) pairs.


def dense_work(rows, row_tokens, text_tokens_per_row, segments_per_row) -> Work:
  """The general path's executed work: the full L x L square of each row, all K x S
  caption slots of a row, every token against all of them."""
  return Work(
      image_tokens=rows * row_tokens, self_pairs=rows * row_tokens * row_tokens,
      captions=rows * segments_per_row, cross_pairs=rows * row_tokens * text_tokens_per_row,
  )


def batch_work(config, host_batch, kind: str = "useful") -> Work:
  """The useful or executed work (see the module docstring) of one host batch."""
  ids = np.asarray(host_batch["segment_ids"])
  rows, length = ids.shape
  k = host_batch["text_mask"].shape[1]
  s = config.text.max_length
  if kind == "executed":
    n = config.dit.get("segment_blocks", 0)
    if n > 1 and length % n == 0 and bool(segments_in_blocks(ids, n, k)):
      return Work(image_tokens=rows * length, self_pairs=rows * n * (length // n) ** 2, captions=rows * n,
                  cross_pairs=rows * length * s)
    work = dense_work(rows, length, k * s, k)
    if "slot_tokens" in host_batch and per_slot_enabled(config.dit):
      # Per-slot cross-attention: K x M gathered queries, S keys each (the model also
      # needs the row's length unsplit over the mesh).
      work = dataclasses.replace(work, cross_pairs=rows * k * host_batch["slot_tokens"].shape[2] * s)
    return work
  if kind != "useful":
    raise ValueError(f"kind {kind!r}: useful | executed")
  real = ids > 0
  lengths = np.stack([np.sum(ids == segment, axis=1) for segment in range(1, k + 1)], 1)  # [R, K]
  return Work(
      image_tokens=int(real.sum()), self_pairs=int(np.sum(lengths**2)), captions=int(np.sum(lengths > 0)),
      cross_pairs=int(real.sum()) * s,
  )


def work_breakdown(config, work: Work):
  """Forward FLOPs by term (dict) of a step's work."""
  d, t = config.dit, config.text
  w, p, c, s = d.width, patch_features(config), t.width, t.max_length
  image, text = work.image_tokens, work.captions * s
  hidden = layers.mlp_hidden(w, d.mlp_ratio, d.mlp)
  mlp_matrices = 3 if d.mlp == "swiglu" else 2  # (gate, up, down) or (up, down).

  def matmul(weights, tokens):
    return 2 * weights * tokens

  terms = {
      "patch_embed": matmul(p * w, image),
      "time_embed": matmul(layers.TIME_FREQUENCIES * w + w * w, image),
      "time_modulation": matmul(w * MODULATIONS * w, image),
      "blocks/self_attn_proj": d.depth * matmul(4 * w * w, image),  # qkv + out.
      "blocks/self_attn": d.depth * 2 * 2 * work.self_pairs * w,
      "blocks/cross_attn_proj_image": d.depth * matmul(2 * w * w, image),  # q + out.
      "blocks/cross_attn_proj_text": d.depth * matmul(2 * c * w, text),  # k + v.
      "blocks/cross_attn": d.depth * 2 * 2 * work.cross_pairs * w,
      "blocks/mlp": d.depth * matmul(mlp_matrices * w * hidden, image),
      "final": matmul(w * p, image),
  }
  if t.encoder == "bytes":
    text_hidden = layers.mlp_hidden(c, TEXT_MLP_RATIO, "gelu")
    terms["text/proj"] = t.depth * matmul(4 * c * c + 2 * c * text_hidden, text)
    terms["text/attn"] = t.depth * work.captions * 2 * 2 * s * s * c
    if t.get("units", "bytes") == "words":  # pool_words: a [S bytes, S words] matmul a caption.
      terms["text/pool_words"] = work.captions * 2 * s * s * c
  else:
    embed_dim = t.embed_dim or (t5.read_config(t.t5_path).d_model if t.t5_path else 0)
    terms["text/proj"] = matmul(embed_dim * c, text)
  return terms


def dit_flops_breakdown(config, rows, row_tokens, text_tokens_per_row, segments_per_row):
  """Forward FLOPs by term of the general path (dense_work): what it executes.
  text_tokens_per_row = segments_per_row x S, the flattened caption slots of a row."""
  if text_tokens_per_row != segments_per_row * config.text.max_length:
    raise ValueError(f"{text_tokens_per_row} text tokens a row != {segments_per_row} slots x text.max_length")
  return work_breakdown(config, dense_work(rows, row_tokens, text_tokens_per_row, segments_per_row))


def dit_flops_per_step(config, rows, row_tokens, text_tokens_per_row, segments_per_row, train=True):
  """Model FLOPs of one general-path step over `rows` packed rows of `row_tokens` tokens
  (train: forward + backward = 3 x forward)."""
  forward = sum(dit_flops_breakdown(config, rows, row_tokens, text_tokens_per_row, segments_per_row).values())
  return 3 * forward if train else forward


def work_flops(config, work: Work, train=True):
  """Model FLOPs of a step's work (train: 3 x forward)."""
  forward = sum(work_breakdown(config, work).values())
  return 3 * forward if train else forward


def dit_param_count(config) -> int:
  """Parameters of the DiT for this config (text encoder included), counted on an
  abstract model: nothing is allocated."""
  abstract = nnx.eval_shape(lambda: DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
