"""Packing latent examples of mixed shapes into fixed-length rows (vidsim/data/packing.py)."""

import json

import grain
import numpy as np
import pytest

from vidsim import patches
from vidsim.data import packing
from vidsim.errors import UsageError

# Latent shapes (t, h, w, c): videos and images, 4 to 20 tokens with patch (1, 2, 2).
SHAPES = [(2, 4, 4, 4), (1, 4, 4, 4), (2, 4, 6, 4), (5, 4, 4, 4), (1, 2, 4, 4), (3, 2, 2, 4)]


def make_examples(n, seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):
    shape = shapes[rng.integers(len(shapes))]
    latent = rng.normal(size=shape).astype(np.float32)
    examples.append(dict(latent=latent, text_tokens=byte_ids(f"example {i}"), id=i))
  return examples


def byte_ids(caption, length=32):
  """The byte tokenizer of the packed format: utf-8 byte + 1, 0-padded (tiny config: 32)."""
  ids = np.zeros(length, np.int32)
  raw = np.frombuffer(caption.encode("utf-8")[:length], np.uint8).astype(np.int32) + 1
  ids[: raw.size] = raw
  return ids


def caption_of(text_tokens):
  return bytes((text_tokens[text_tokens > 0] - 1).astype(np.uint8).tolist()).decode()


def packed(config, examples, **kwargs):
  return list(packing.packed_dataset(grain.MapDataset.source(examples), config, **kwargs))


def test_rows_fixed_length_and_format(tiny_config):
  batches = packed(tiny_config, make_examples(300))
  r, l, k, s = 8, tiny_config.train.row_tokens, tiny_config.train.max_segments_per_row, tiny_config.text.max_length
  assert len(batches) >= 3
  for batch in batches:
    assert batch["tokens"].shape == (r, l, 16) and batch["tokens"].dtype == np.float32
    assert batch["positions"].shape == (r, l, 3) and batch["positions"].dtype == np.int32
    assert batch["segment_ids"].shape == (r, l) and batch["segment_ids"].dtype == np.int32
    assert batch["segment_frames"].shape == (r, k) and batch["segment_frames"].dtype == np.int32
    assert batch["text_tokens"].shape == (r, k, s) and batch["text_tokens"].dtype == np.int32
    assert batch["text_mask"].shape == (r, k, s) and batch["text_mask"].dtype == bool
    assert set(batch) == {"tokens", "positions", "segment_ids", "segment_frames", "text_tokens", "text_mask"}


def test_segments_contiguous_padding_zero_and_slots_match(tiny_config):
  for batch in packed(tiny_config, make_examples(300, seed=1)):
    for row in range(batch["segment_ids"].shape[0]):
      ids = batch["segment_ids"][row]
      n = ids.max()
      assert 1 <= n <= tiny_config.train.max_segments_per_row
      # Segments 1..n in order, each one contiguous run, then padding only.
      runs = [v for i, v in enumerate(ids) if i == 0 or v != ids[i - 1]]
      assert runs in (list(range(1, n + 1)), list(range(1, n + 1)) + [0])
      pad = ids == 0
      assert not batch["tokens"][row][pad].any() and not batch["positions"][row][pad].any()
      frames = batch["segment_frames"][row]
      assert (frames[:n] > 0).all() and (frames[n:] == 0).all()
      assert batch["text_mask"][row][:n].any(axis=1).all() and not batch["text_mask"][row][n:].any()
      for k in range(1, n + 1):
        assert batch["positions"][row][ids == k][:, 0].max() + 1 == frames[k - 1]


def test_every_token_is_its_patch_and_every_example_appears_once(tiny_config):
  examples = make_examples(300, seed=2)
  by_caption = {caption_of(e["text_tokens"]): e for e in examples}
  seen = []
  patch = tuple(tiny_config.dit.patch_size)
  for batch in packed(tiny_config, examples):
    for row in range(batch["segment_ids"].shape[0]):
      ids = batch["segment_ids"][row]
      for k in range(1, ids.max() + 1):
        caption = caption_of(batch["text_tokens"][row, k - 1])
        source = by_caption[caption]["latent"]
        segment = ids == k
        tokens, positions = batch["tokens"][row][segment], batch["positions"][row][segment]
        rebuilt = patches.unpatchify(tokens, positions, patch, source.shape)
        np.testing.assert_array_equal(rebuilt, source)
        np.testing.assert_array_equal(batch["text_tokens"][row, k - 1], by_caption[caption]["text_tokens"])
        np.testing.assert_array_equal(batch["text_mask"][row, k - 1], by_caption[caption]["text_tokens"] > 0)
        seen.append(caption)
  assert len(seen) == len(set(seen))
  # Each batch takes a contiguous run of the stream; only the last partial batch is dropped.
  assert len(seen) > 0.8 * len(examples) and set(seen) == {caption_of(e["text_tokens"]) for e in examples[: len(seen)]}


def test_packing_efficiency(tiny_config):
  examples = make_examples(300, seed=3)
  tokens_per_example = [len(patches.patchify(e["latent"], (1, 2, 2))[0]) for e in examples]
  consumed = 0
  for batch in packed(tiny_config, examples):
    segments = int(sum(batch["segment_ids"][r].max() for r in range(8)))
    real = sum(tokens_per_example[consumed : consumed + segments])
    consumed += segments
    assert packing.packing_efficiency(batch) == pytest.approx(real / (8 * tiny_config.train.row_tokens))
    assert packing.packing_efficiency(batch) > 0.8  # Small samples fill 64-token rows well.


def test_long_samples_keep_their_leading_frames(tiny_config):
  long_video = np.random.default_rng(0).normal(size=(40, 4, 4, 4)).astype(np.float32)  # 160 tokens.
  examples = [dict(latent=long_video, text_tokens=byte_ids("long"))] + make_examples(100, seed=4)
  batch = packed(tiny_config, examples)[0]
  segment = batch["segment_ids"][0] == 1
  assert batch["segment_frames"][0, 0] == 16  # 64 tokens / 4 tokens per frame.
  rebuilt = patches.unpatchify(batch["tokens"][0][segment], batch["positions"][0][segment], (1, 2, 2), (16, 4, 4, 4))
  np.testing.assert_array_equal(rebuilt, long_video[:16])
  # Temporal patches: whole patch frames only.
  np.testing.assert_array_equal(packing.leading_crop(long_video[:5], (2, 2, 2), 64), long_video[:4])
  np.testing.assert_array_equal(packing.leading_crop(long_video, (2, 2, 2), 20), long_video[:10])
  with pytest.raises(UsageError, match="more than train.row_tokens=64"):
    packing.leading_crop(np.zeros((1, 20, 20, 4), np.float32), (1, 2, 2), 64)


def test_segment_limit_per_row(tiny_config):
  tiny_config.train.max_segments_per_row = 3
  images = make_examples(200, seed=5, shapes=[(1, 2, 2, 4)])  # 1 token each.
  for batch in packed(tiny_config, images):
    assert batch["segment_ids"].max() == 3 and batch["segment_frames"].shape == (8, 3)


def test_resume_gives_the_same_next_batches(tiny_config):
  source = grain.MapDataset.source(make_examples(200, seed=6)).shuffle(seed=0).repeat()
  dataset = packing.packed_dataset(source, tiny_config)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # What grain's Orbax handler stores.
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_grain_checkpoint_helper_on_every_state(tiny_config):
  dataset = packing.packed_dataset(grain.MapDataset.source(make_examples(150, seed=7)), tiny_config)
  grain.experimental.assert_equal_output_after_checkpoint(dataset)


def test_precomputed_text_embeddings(tiny_config):
  tiny_config.text.encoder = "precomputed"
  tiny_config.text.embed_dim = 6
  examples = make_examples(150, seed=8)
  for i, e in enumerate(examples):
    e["text_embeddings"] = np.full((tiny_config.text.max_length, 6), i, np.float32)
    e["text_mask"] = np.arange(tiny_config.text.max_length) < 5
  batch = packed(tiny_config, examples)[0]
  assert "text_tokens" not in batch
  assert batch["text_embeddings"].shape == (8, 8, tiny_config.text.max_length, 6)
  n = batch["segment_ids"][0].max()
  for k in range(1, n + 1):  # The embedding in slot k-1 is that of the example in segment k.
    source = examples[int(batch["text_embeddings"][0, k - 1, 0, 0])]["latent"]
    segment = batch["segment_ids"][0] == k
    np.testing.assert_array_equal(batch["tokens"][0][segment], patches.patchify(source, (1, 2, 2))[0])
  assert batch["text_mask"][0, :n, :5].all() and not batch["text_mask"][0, :n, 5:].any()
  examples[0]["text_embeddings"] = np.zeros((tiny_config.text.max_length, 7), np.float32)
  with pytest.raises(UsageError, match="text.embed_dim"):
    packed(tiny_config, examples)


def test_host_share_and_bad_inputs(tiny_config):
  assert packing.host_rows(tiny_config, process_count=2) == 4
  batches = packed(tiny_config, make_examples(100, seed=9), process_count=2)
  assert batches[0]["tokens"].shape[0] == 4
  assert packed(tiny_config, make_examples(100, seed=9), rows=3)[0]["tokens"].shape[0] == 3
  with pytest.raises(UsageError, match="multiple of the process count 3"):
    packing.host_rows(tiny_config, process_count=3)
  bad = make_examples(20)
  bad[0]["text_tokens"] = np.ones(5, np.int32)
  with pytest.raises(UsageError, match=r"'text_tokens'.*\(5,\).*text.max_length"):
    packed(tiny_config, bad)
  with pytest.raises(UsageError, match=r"\(1, 4, 5\).*nearest valid sizes"):
    packed(tiny_config, [dict(latent=np.zeros((1, 4, 5, 4), np.float32), text_tokens=byte_ids("x"))])
  with pytest.raises(UsageError, match="needs 'text_tokens'"):
    packed(tiny_config, [dict(latent=np.zeros((1, 4, 4, 4), np.float32), caption="x")])
