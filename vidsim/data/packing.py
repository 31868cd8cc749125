"""NaViT-style packing: latent grids of any shape -> fixed-length rows of patch tokens.

A grain stage over latent-cache examples (dicts with `latent` float32 [t, h, w, c],
already normalised, and `text_tokens` int32 [S] + `text_mask` bool [S], or
`text_embeddings` float32 [S, E] + `text_mask`). Each example is cropped to fit a
row, patchified, and packed first-fit with grain's `FirstFitPackIterDataset`
(it packs N-dimensional features and keeps its own checkpointable state). Per-segment
features (text, frame count) ride along as length-1 sequences packed into K slots,
so slot k of a row always belongs to segment k + 1.

Host-local batch (R = train.rows_per_batch / process_count rows, L =
train.row_tokens tokens, K = train.max_segments_per_row, S = text.max_length):
  tokens          float32 [R, L, P]   clean latent patches (P = pt*ph*pw*c)
  positions       int32   [R, L, 3]   (t, h, w) of the patch in its sample's patch grid
  segment_ids     int32   [R, L]      1..K per sample, 0 for padding
  segment_frames  int32   [R, K]      patch-grid frames of segment k+1 (0 = empty slot)
  text_tokens     int32   [R, K, S]   caption bytes + 1, 0 = padding   (text.encoder=bytes)
  text_embeddings float32 [R, K, S, E]                                  (text.encoder=precomputed)
  text_mask       bool    [R, K, S]   valid text positions
Example ids and other keys are dropped. `packing_efficiency(batch)` is the share of
real tokens, which the train loop logs.

Crop rule: a sample with more tokens than a row keeps its LEADING whole patch frames,
as many as fit. Leading, not random, because the causal VAE encodes the first frame
alone: a crop that starts later would begin with a latent the decoder never sees
first. Frames are also cut to a multiple of pt. Images never need cropping; a single
frame larger than a row is a UsageError.
"""

import grain
import jax
import numpy as np

from vidsim import patches
from vidsim.errors import UsageError

# Features packed along the token axis (length L) and per segment (length K).
_TOKEN_FEATURES = ("tokens", "positions")
_TEXT_FEATURES = {"bytes": ("text_tokens", "text_mask"), "precomputed": ("text_embeddings", "text_mask")}


def host_rows(config, process_count=None) -> int:
  """This process's rows per batch: train.rows_per_batch split evenly over processes."""
  count = jax.process_count() if process_count is None else process_count
  rows = config.train.rows_per_batch
  if rows < 1 or rows % count:
    raise UsageError(f"train.rows_per_batch={rows} must be a positive multiple of the process count {count}")
  return rows // count


def leading_crop(latent, patch_size, row_tokens: int):
  """Keeps the leading whole patch frames of `latent` [t, h, w, c] that fit in row_tokens (see crop rule)."""
  t, h, w, _ = latent.shape
  pt, ph, pw = patch_size
  _, grid_h, grid_w = patches.patch_grid_shape((pt, h, w), patch_size)  # Checks h, w.
  per_frame = grid_h * grid_w
  if per_frame > row_tokens:
    raise UsageError(
        f"a latent frame of shape {latent.shape[1:]} makes {per_frame} tokens with dit.patch_size "
        f"{tuple(patch_size)}, more than train.row_tokens={row_tokens}: raise row_tokens to at least "
        f"{per_frame} or use smaller frames"
    )
  keep = min(t // pt, row_tokens // per_frame) * pt
  return latent if keep == t else latent[: max(keep, pt)]  # Shorter than pt: patchify names it.


def _packable(example, *, config):
  """One latent-cache example -> the features the packer packs (one segment)."""
  if "latent" not in example:
    raise UsageError(f"latent example has no 'latent' key; keys: {sorted(example)}")
  latent = np.asarray(example["latent"], np.float32)
  if latent.ndim != 4:
    raise UsageError(f"example 'latent' must be [t, h, w, c], got shape {latent.shape}")
  patch_size = tuple(config.dit.patch_size)
  tokens, positions = patches.patchify(leading_crop(latent, patch_size, config.train.row_tokens), patch_size)
  out = dict(tokens=tokens, positions=positions)
  out["segment_frames"] = np.asarray([positions[-1, 0] + 1], np.int32)
  out.update(_segment_text(example, config))
  return out


def _segment_text(example, config):
  """Text features with a leading segment axis of 1, checked against text.max_length."""
  length = config.text.max_length
  encoder = config.text.encoder
  if encoder not in _TEXT_FEATURES:
    raise UsageError(f"text.encoder={encoder!r}; valid: {', '.join(_TEXT_FEATURES)}")
  if encoder == "bytes":
    if "text_tokens" not in example:
      raise UsageError(f"text.encoder=bytes needs 'text_tokens' in the latent cache; keys: {sorted(example)}")
    ids = np.asarray(example["text_tokens"], np.int32)
    mask = np.asarray(example.get("text_mask", ids > 0), bool)
    text = dict(text_tokens=ids)
  else:
    if "text_embeddings" not in example or "text_mask" not in example:
      raise UsageError(
          "text.encoder=precomputed needs 'text_embeddings' and 'text_mask' in the latent cache; "
          f"keys: {sorted(example)}"
      )
    text = dict(text_embeddings=np.asarray(example["text_embeddings"], np.float32))
    mask = np.asarray(example["text_mask"], bool)
    dim = config.text.embed_dim
    if text["text_embeddings"].ndim != 2 or (dim and text["text_embeddings"].shape[1] != dim):
      raise UsageError(
          f"text_embeddings of shape {text['text_embeddings'].shape}: expected [{length}, {dim or 'E'}] "
          "(text.max_length, text.embed_dim)"
      )
  text["text_mask"] = mask
  for name, value in text.items():
    if value.shape[0] != length:
      raise UsageError(f"example {name!r} has shape {value.shape}; expected {length} positions (text.max_length)")
  return {name: value[None] for name, value in text.items()}


def _to_packed_format(row):
  """grain's packed row -> the batch format above (segment ids of the token feature; slot order)."""
  out = {name: row[name] for name in row if not name.endswith(("_segment_ids", "_positions"))}
  out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
  return out


def packed_dataset(examples, config, *, rows=None, process_count=None):
  """grain IterDataset of host-local packed batches from a (Map|Iter)Dataset of latent examples.

  rows: rows per batch (default: `host_rows(config, process_count)`).

  First-fit over the R open rows of a batch: an example goes into the first row with
  room for its tokens and a free segment slot; when none has, the R rows are emitted
  as one batch and a new batch starts with that example. The iterator's
  get_state/set_state (grain's) resume exactly: same next batches.
  """
  if isinstance(examples, grain.MapDataset):
    examples = examples.to_iter_dataset()
  rows = host_rows(config, process_count) if rows is None else rows
  row_tokens, slots = config.train.row_tokens, config.train.max_segments_per_row
  if slots < 1:
    raise UsageError(f"train.max_segments_per_row must be >= 1, got {slots}")
  segment_features = ("segment_frames",) + _TEXT_FEATURES.get(config.text.encoder, ())
  lengths = {name: row_tokens for name in _TOKEN_FEATURES}
  lengths.update({name: slots for name in segment_features})
  packed = grain.experimental.FirstFitPackIterDataset(
      examples.map(lambda example: _packable(example, config=config)),
      length_struct=lengths,
      num_packing_bins=rows,
      shuffle_bins=False,  # The upstream order is already shuffled; keep rows in packing order.
      max_sequences_per_bin=slots,
  )
  return packed.map(_to_packed_format).batch(rows, drop_remainder=True)


def packing_efficiency(batch) -> float:
  """Real tokens / all tokens of a packed batch (1.0 = no padding)."""
  segment_ids = np.asarray(batch["segment_ids"])
  return float(np.count_nonzero(segment_ids)) / segment_ids.size
