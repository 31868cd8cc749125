"""DiT FLOP count against a count written out by hand, and the parameter count."""

import math

import jax
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim.models.dit import DiT
from vidsim.models.flops import dit_flops_breakdown, dit_flops_per_step, dit_param_count


def small_config(mlp="gelu", encoder="bytes"):
  c = config_lib.base_config()
  with c.unlocked():
    c.dit.patch_size = (1, 2, 2)
    c.vae.latent_channels = 4  # P = 16.
    c.dit.width, c.dit.depth, c.dit.heads, c.dit.mlp_ratio, c.dit.mlp = 32, 2, 2, 4.0, mlp
    c.text.width, c.text.depth, c.text.heads, c.text.max_length = 32, 1, 2, 8
    c.text.encoder = encoder
    c.text.embed_dim = 12
  return c


# One row of L = 10 image tokens, K = 2 caption slots of S = 8 bytes (16 text tokens).
ROWS, L, K, S = 1, 10, 2, 8


def test_forward_flops_match_hand_count():
  hand = {
      "patch_embed": 2 * 16 * 32 * 10,
      "time_embed": 2 * (256 * 32 + 32 * 32) * 10,
      "time_modulation": 2 * 32 * 192 * 10,
      # Per block: qkv 3 W^2 + out W^2 over 10 image tokens.
      "blocks/self_attn_proj": 2 * (2 * 4 * 32 * 32 * 10),
      # Per block: scores + values, 2 x 2 x L^2 x W (the full 10 x 10 square).
      "blocks/self_attn": 2 * (2 * 2 * 10 * 10 * 32),
      "blocks/cross_attn_proj_image": 2 * (2 * 2 * 32 * 32 * 10),
      # k, v from the 16 text slots: 2 x (2 x C x W) x 16.
      "blocks/cross_attn_proj_text": 2 * (2 * 2 * 32 * 32 * 16),
      "blocks/cross_attn": 2 * (2 * 2 * 10 * 16 * 32),
      # GELU MLP, hidden 128: up + down.
      "blocks/mlp": 2 * (2 * 2 * 32 * 128 * 10),
      "final": 2 * 32 * 16 * 10,
      # One byte-encoder layer over 16 text slots: qkv + out 4 C^2, MLP 2 x C x 128.
      "text/proj": 2 * (4 * 32 * 32 + 2 * 32 * 128) * 16,
      # Its attention: 2 captions x 2 x 2 x S^2 x C.
      "text/attn": 2 * 2 * 2 * 8 * 8 * 32,
  }
  assert dit_flops_breakdown(small_config(), ROWS, L, K * S, K) == hand
  assert dit_flops_per_step(small_config(), ROWS, L, K * S, K) == 3 * sum(hand.values()) == 4_525_056
  assert dit_flops_per_step(small_config(), ROWS, L, K * S, K, train=False) == 1_508_352


def test_swiglu_and_precomputed_terms():
  swiglu = dit_flops_breakdown(small_config(mlp="swiglu"), ROWS, L, K * S, K)
  assert swiglu["blocks/mlp"] == 2 * (2 * 3 * 32 * 88 * 10)  # hidden = 8 ceil(2/3 128 / 8) = 88.
  words = small_config()
  with words.unlocked():
    words.text.units = "words"
  assert dit_flops_breakdown(words, ROWS, L, K * S, K)["text/pool_words"] == 2 * 2 * 8 * 8 * 32  # K x 2 S^2 C.
  pre = dit_flops_breakdown(small_config(encoder="precomputed"), ROWS, L, K * S, K)
  assert pre["text/proj"] == 2 * 12 * 32 * 16 and "text/attn" not in pre


def test_flops_scale_with_rows_and_quadratically_with_length():
  c = small_config()
  assert dit_flops_per_step(c, 4, L, K * S, K) == 4 * dit_flops_per_step(c, 1, L, K * S, K)
  one = dit_flops_breakdown(c, 1, 10, K * S, K)["blocks/self_attn"]
  assert dit_flops_breakdown(c, 1, 20, K * S, K)["blocks/self_attn"] == 4 * one


def test_param_count_matches_hand_count():
  text = (
      257 * 32 + 8 * 32  # Byte embeddings, positions.
      + 32 + 32 * 3 * 32 + 32 * 32 + 2 * 16  # norm1, qkv, out, qk-norm.
      + 32 + (32 * 128 + 128) + (128 * 32 + 32)  # norm2, MLP.
      + 32  # Final norm.
  )
  block = (
      6 * 32  # adaLN table.
      + 3 * 32 * 32 + 32 * 32 + 2 * 16  # Self-attention qkv, out, qk-norm.
      + 32 * 32 + 2 * 32 * 32 + 32 * 32 + 2 * 16  # Cross q, kv, out, qk-norm.
      + (32 * 128 + 128) + (128 * 32 + 32)  # MLP.
  )
  hand = (
      text + 8 * 32  # Null caption.
      + 16 * 32 + 32  # Patch embedding.
      + (256 * 32 + 32) + (32 * 32 + 32)  # Timestep MLP.
      + (32 * 192 + 192)  # adaLN-single projection.
      + 2 * block
      + 2 * 32 + 32 * 16 + 16  # Final adaLN table and linear.
  )
  assert dit_param_count(small_config()) == hand == 71_664


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_param_count_matches_a_built_model(mlp):
  c = small_config(mlp)
  model = DiT(c.dit, c.text, c.vae.latent_channels, rngs=nnx.Rngs(0))
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert dit_param_count(c) == built


def test_useful_and_executed_work_of_a_packed_batch():
  """Row 0: segments of 4 and 3 tokens + 1 padding; row 1: one of 4 + padding (L = 8, K = 2)."""
  import numpy as np
  from vidsim.models.flops import Work, batch_work

  c = small_config()
  ids = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  batch = {"segment_ids": ids, "text_mask": np.ones((2, K, S), bool)}
  assert batch_work(c, batch, "useful") == Work(image_tokens=11, self_pairs=16 + 9 + 16, captions=3,
                                                cross_pairs=11 * S)
  assert batch_work(c, batch, "executed") == Work(image_tokens=16, self_pairs=2 * 64, captions=2 * K,
                                                  cross_pairs=16 * K * S)
  with c.unlocked():
    c.dit.segment_blocks = 2  # Both rows align to blocks of 4: each block one segment.
  assert batch_work(c, batch, "executed") == Work(image_tokens=16, self_pairs=2 * 2 * 16, captions=2 * 2,
                                                  cross_pairs=16 * S)
  ids[1, 4] = 1  # Segment 1 now reaches into block 2: the general path runs.
  assert batch_work(c, batch, "executed").self_pairs == 2 * 64
