"""Model FLOPs of a DiT train step and its parameter count.

Counting rule (the one MFU is quoted against):
- Every weight matrix: 2 x its size x the number of tokens it is applied to,
  forward. Image-side weights see every row token (padding included: it is
  computed), text-side weights see every text slot (K x S per row, padding and
  empty slots included), the timestep MLP and adaLN-single projection see every
  image token (time is per token). Biases, norms, elementwise ops and the byte
  embedding lookup (a gather) are not counted.
- Attention: 2 matmuls (scores, values) x 2 x query tokens x key tokens x width
  per row, forward. Self-attention counts the FULL L x L square of a row, not
  only within-segment pairs: the XLA kernel computes the whole masked square,
  so that is the work done. Cross-attention counts L x (K x S) per row; the byte
  encoder counts S x S per caption slot.
- A train step is 3 x forward (backward = 2 x forward). Rematerialisation is not
  counted (model FLOPs, not hardware FLOPs).
"""

import math

import jax
from flax import nnx

from vidsim.models import layers
from vidsim.models import t5
from vidsim.models.dit import MODULATIONS, DiT, patch_features
from vidsim.models.text import TEXT_MLP_RATIO


def dit_flops_breakdown(config, rows, row_tokens, text_tokens_per_row, segments_per_row):
  """Forward FLOPs by term (dict). text_tokens_per_row = segments_per_row x S, the
  flattened caption slots of a row (S = config.text.max_length in the packed format)."""
  d, t = config.dit, config.text
  w, p, c = d.width, patch_features(config), t.width
  image = rows * row_tokens  # Image tokens in the step.
  text = rows * text_tokens_per_row  # Text slots in the step.
  caption = text_tokens_per_row // max(segments_per_row, 1)  # S.
  hidden = layers.mlp_hidden(w, d.mlp_ratio, d.mlp)
  mlp_matrices = 3 if d.mlp == "swiglu" else 2  # (gate, up, down) or (up, down).

  def matmul(weights, tokens):
    return 2 * weights * tokens

  terms = {
      "patch_embed": matmul(p * w, image),
      "time_embed": matmul(layers.TIME_FREQUENCIES * w + w * w, image),
      "time_modulation": matmul(w * MODULATIONS * w, image),
      "blocks/self_attn_proj": d.depth * matmul(4 * w * w, image),  # qkv + out.
      "blocks/self_attn": d.depth * rows * 2 * 2 * row_tokens * row_tokens * w,
      "blocks/cross_attn_proj_image": d.depth * matmul(2 * w * w, image),  # q + out.
      "blocks/cross_attn_proj_text": d.depth * matmul(2 * c * w, text),  # k + v.
      "blocks/cross_attn": d.depth * rows * 2 * 2 * row_tokens * text_tokens_per_row * w,
      "blocks/mlp": d.depth * matmul(mlp_matrices * w * hidden, image),
      "final": matmul(w * p, image),
  }
  if t.encoder == "bytes":
    text_hidden = layers.mlp_hidden(c, TEXT_MLP_RATIO, "gelu")
    terms["text/proj"] = t.depth * matmul(4 * c * c + 2 * c * text_hidden, text)
    terms["text/attn"] = t.depth * rows * segments_per_row * 2 * 2 * caption * caption * c
  else:
    embed_dim = t.embed_dim or (t5.read_config(t.t5_path).d_model if t.t5_path else 0)
    terms["text/proj"] = matmul(embed_dim * c, text)
  return terms


def dit_flops_per_step(config, rows, row_tokens, text_tokens_per_row, segments_per_row, train=True):
  """Model FLOPs of one step over `rows` packed rows of `row_tokens` tokens
  (train: forward + backward = 3 x forward)."""
  forward = sum(dit_flops_breakdown(config, rows, row_tokens, text_tokens_per_row, segments_per_row).values())
  return 3 * forward if train else forward


def dit_param_count(config) -> int:
  """Parameters of the DiT for this config (text encoder included), counted on an
  abstract model: nothing is allocated."""
  abstract = nnx.eval_shape(lambda: DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
