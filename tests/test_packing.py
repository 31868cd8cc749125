"""Packing latent examples of mixed shapes into fixed-length rows (vidsim/data/packing.py),
planned globally so every process count sees the same batches, and read from the latent cache."""

import collections
import json
import types

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from vidsim import latents, patches
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
    m = batch["slot_tokens"].shape[2]  # The largest sample: these are at most half a row.
    assert batch["slot_tokens"].shape == (r, k, m) and batch["slot_tokens"].dtype == np.int32 and m <= l // 2
    assert set(batch) == {"tokens", "positions", "segment_ids", "segment_frames", "text_tokens", "text_mask",
                          "slot_tokens"}


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
      for k, places in enumerate(batch["slot_tokens"][row]):  # Each slot lists its segment's positions.
        where = np.flatnonzero(ids == k + 1)
        np.testing.assert_array_equal(places, np.pad(where, (0, len(places) - len(where)), constant_values=-1))
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


def test_segment_blocks_put_one_example_at_the_start_of_each_block(tiny_config):
  """dit.segment_blocks = 2: rows of 64 are two blocks of 32 with one example each, in
  stream order, so every batch takes the DiT's blocked path; each process reads its rows."""
  from vidsim.models import dit

  tiny_config.dit.segment_blocks = 2
  examples = make_examples(100, seed=11)  # 2-20 tokens each.
  batches = packed(tiny_config, examples)
  assert len(batches) == 100 // 16
  order = []
  for batch in batches:
    assert bool(dit.segments_in_blocks(batch["segment_ids"], 2, tiny_config.train.max_segments_per_row))
    for row in range(8):
      for block in range(2):
        ids = batch["segment_ids"][row, block * 32 : (block + 1) * 32]
        n = int(np.count_nonzero(ids))
        assert (ids[:n] == block + 1).all() and not ids[n:].any()  # Leading, then padding.
        source = examples[len(order)]
        tokens, positions = patches.patchify(source["latent"], (1, 2, 2))
        np.testing.assert_array_equal(batch["tokens"][row, block * 32 : block * 32 + n], tokens)
        np.testing.assert_array_equal(batch["positions"][row, block * 32 : block * 32 + n], positions)
        assert caption_of(batch["text_tokens"][row, block]) == f"example {len(order)}"
        order.append(len(order))
      assert not batch["text_mask"][row, 2:].any()  # Slots past the blocks stay empty.
  shares = [packed(tiny_config, examples, process_index=p, process_count=2) for p in range(2)]
  for whole, first, second in zip(batches, *shares):
    np.testing.assert_array_equal(np.concatenate([first["tokens"], second["tokens"]]), whole["tokens"])


@pytest.mark.parametrize("override, reason", [
    ({"dit.segment_blocks": 4}, "the largest example has 20 tokens, more than a block of 16"),
    ({"dit.segment_blocks": 3}, "train.row_tokens=64 is not a multiple of dit.segment_blocks=3"),
    ({"dit.segment_blocks": 2, "train.max_segments_per_row": 1}, "max_segments_per_row=1 is less than"),
])
def test_segment_blocks_that_do_not_apply_fall_back_to_first_fit(tiny_config, caplog, override, reason):
  for key, value in override.items():
    section, name = key.split(".")
    tiny_config[section][name] = value
  examples = make_examples(100, seed=12)
  with caplog.at_level("INFO"):
    batch = packed(tiny_config, examples)[0]
  assert reason in caplog.text and "first-fit" in caplog.text
  assert batch["segment_ids"][0].max() > 1 or tiny_config.train.max_segments_per_row == 1
  tiny_config.dit.segment_blocks = 0
  assert_same_batch(batch, packed(tiny_config, examples)[0])  # Plain first-fit.
  with pytest.raises(ValueError, match="use plan_blocks"):
    packing.PackPlanIterDataset([20], rows=8, row_tokens=64, slots=8, seed=0, shuffle=False, repeat=False,
                                process_index=0, process_count=1, blocks=4)


def test_resume_gives_the_same_next_batches(tiny_config):
  dataset = packing.packed_dataset(make_examples(200, seed=6), tiny_config, shuffle=True, repeat=True)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # What grain's Orbax handler stores.
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    assert_same_batch(next(resumed), want)


def assert_same_batch(got, want):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


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
  batches = packed(tiny_config, make_examples(100, seed=9), process_count=2)
  assert batches[0]["tokens"].shape[0] == 4
  tiny_config.train.rows_per_batch = 3
  assert packed(tiny_config, make_examples(100, seed=9))[0]["tokens"].shape[0] == 3
  with pytest.raises(UsageError, match="multiple of the process count 2"):
    packed(tiny_config, make_examples(20), process_count=2)
  tiny_config.train.rows_per_batch = 8
  bad = make_examples(100)  # More than one batch: the bad example is read.
  bad[0]["text_tokens"] = np.ones(5, np.int32)
  with pytest.raises(UsageError, match=r"'text_tokens'.*\(5,\).*text.max_length"):
    packed(tiny_config, bad)
  with pytest.raises(UsageError, match=r"\(1, 4, 5\).*nearest valid sizes"):
    packed(tiny_config, [dict(latent=np.zeros((1, 4, 5, 4), np.float32), text_tokens=byte_ids("x"))])
  with pytest.raises(UsageError, match="needs 'text_tokens'"):
    packed(tiny_config, [dict(latent=np.zeros((1, 4, 4, 4), np.float32), caption="x")] * 70)
  with pytest.raises(UsageError, match="no 'latent' key"):
    packed(tiny_config, [dict(text_tokens=byte_ids("x"))])


# ------------------------------------------------------------------ one global plan, any process count


def plans(tokens, config, process_index=0, process_count=1, seed=0):
  return packing.PackPlanIterDataset(
      tokens, rows=config.train.rows_per_batch, row_tokens=config.train.row_tokens,
      slots=config.train.max_segments_per_row, seed=seed, shuffle=True, repeat=True,
      process_index=process_index, process_count=process_count)


def random_tokens(n, seed=0):
  return np.random.default_rng(seed).integers(1, 65, size=n)  # 1..row_tokens of the tiny config.


@pytest.mark.parametrize("count", [2, 4])
def test_every_process_plans_the_same_batches_and_their_rows_make_the_one_process_plan(tiny_config, count):
  tokens = random_tokens(90)
  single = iter(plans(tokens, tiny_config))
  shares = [iter(plans(tokens, tiny_config, p, count)) for p in range(count)]
  for _ in range(25):  # About 4 epochs.
    whole = next(single)
    parts = [next(share) for share in shares]
    assert {part["start"] for part in parts} == {whole["start"]}
    assert [row for part in parts for row in part["rows"]] == whole["rows"]
    assert {json.dumps(share.get_state()) for share in shares} == {json.dumps(single.get_state())}
    for row in whole["rows"]:
      assert 1 <= len(row) <= tiny_config.train.max_segments_per_row
      assert sum(t for _, _, t in row) <= tiny_config.train.row_tokens


def test_plan_covers_each_epoch_once_in_stream_order(tiny_config):
  tokens = random_tokens(90, seed=1)
  iterator = iter(plans(tokens, tiny_config, seed=3))
  positions, records = [], []
  while len(positions) < 3 * 90:
    plan = next(iterator)
    assert plan["start"] == len(positions)  # Each batch starts where the last one stopped.
    batch = sorted(entry for row in plan["rows"] for entry in row)
    positions += [p for p, _, _ in batch]
    records += [r for _, r, _ in batch]
    assert all(t == tokens[r] for _, r, t in batch)
  assert positions == list(range(len(positions)))  # No gaps, no repeats.
  epochs = [records[e * 90 : (e + 1) * 90] for e in range(3)]
  assert all(sorted(epoch) == list(range(90)) for epoch in epochs)  # Every example once per epoch.
  assert epochs[0] != epochs[1]  # Each epoch has its own order.


@pytest.mark.parametrize("rows, slots", [(1, 8), (8, 3), (37, 8)])
def test_plan_is_first_fit_over_the_batch_rows(rows, slots):
  """The planner's fast row search places every example where a plain scan of the rows would."""
  tokens = np.random.default_rng(rows).integers(1, 65, size=500)
  order = packing.EpochOrder(len(tokens), seed=1, shuffle=True)
  position = 0
  for _ in range(10):
    members, next_position = packing.plan_batch(order, tokens, position, rows=rows, row_tokens=64, slots=slots)
    expected = [[] for _ in range(rows)]
    used = [0] * rows
    for p in range(position, next_position + 1):
      fits = [r for r in range(rows) if used[r] + tokens[order[p]] <= 64 and len(expected[r]) < slots]
      if not fits:
        break
      used[fits[0]] += tokens[order[p]]
      expected[fits[0]].append(p)
    assert p == next_position and members == expected
    position = next_position


def test_a_state_of_the_old_per_process_packer_is_refused_clearly(tiny_config):
  iterator = iter(packing.packed_dataset(make_examples(100), tiny_config))
  with pytest.raises(UsageError, match="older vidsim"):
    iterator.set_state({"parent": {"next_index": 3}, "packer": {}})


# ------------------------------------------------------------------ from the latent cache


def write_cache(workdir, config, n=60, seed=0):
  """A latent cache as `vidsim encode` leaves it: shards, shape index and manifest."""
  rng = np.random.default_rng(seed)
  root = latents.cache_dir(workdir)
  root.mkdir(parents=True)
  per_shard = 16
  for k, start in enumerate(range(0, n, per_shard)):
    writer = ArrayRecordWriter(str(root / latents.shard_name("train", k, -(-n // per_shard))), "group_size:1")
    for i in range(start, min(start + per_shard, n)):
      shape = SHAPES[rng.integers(len(SHAPES))]
      writer.write(serialization.msgpack_serialize({
          "mean": rng.normal(size=shape).astype(np.float32), "std": np.full(shape, 0.1, np.float32),
          "example_id": np.int64(1000 + i), "index": np.int64(i),
          "text_tokens": byte_ids(f"example {i}"), "text_mask": byte_ids(f"example {i}") > 0,
      }))
    writer.close()
  vae = types.SimpleNamespace(fingerprint="f" * 16, step=1, shift=[0.5] * 4, scale=[2.0] * 4)
  config.encode.splits = ("train",)
  manifest = latents._build_manifest(root, config, vae)
  (root / "manifest.json").write_text(json.dumps(manifest))
  return latents.load_manifest(workdir)


def cached_batches(config, workdir, manifest, count=1, index=0, state=None, batches=6):
  iterator = iter(latents.packed_latents(config, workdir, "train", manifest, seed=5,
                                         process_index=index, process_count=count))
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(batches)], iterator.get_state()


def captions_in(batch):
  return [caption_of(batch["text_tokens"][r, k]) for r in range(batch["segment_ids"].shape[0])
          for k in range(batch["segment_ids"][r].max())]


def test_cache_shape_index_matches_the_latents(tiny_config, tmp_path):
  manifest = write_cache(tmp_path, tiny_config)
  shapes = latents.latent_shapes(tmp_path, "train", manifest)
  source = latents.cache_source(tmp_path, "train", manifest)
  assert len(shapes) == len(source) == 60
  for i in range(len(source)):
    assert tuple(shapes[i]) == latents.read_record(source[i])["mean"].shape
  assert sum(manifest["splits"]["train"]["latent_shapes"].values()) == 60


def test_cache_batches_union_over_processes_is_the_one_process_batch(tiny_config, tmp_path):
  manifest = write_cache(tmp_path, tiny_config)
  single, single_state = cached_batches(tiny_config, tmp_path, manifest)
  for count in (1, 2, 4):
    shares = [cached_batches(tiny_config, tmp_path, manifest, count, p) for p in range(count)]
    assert all(state == single_state for _, state in shares)
    for step, whole in enumerate(single):
      parts = [batches[step] for batches, _ in shares]
      assert all(part["tokens"].shape[0] == 8 // count for part in parts)
      assert_same_batch({k: np.concatenate([part[k] for part in parts]) for k in whole}, whole)
  # The latent is (mean + std * eps - shift) / scale: close to (mean - 0.5) / 2, never equal.
  source = latents.cache_source(tmp_path, "train", manifest)
  first = latents.read_record(source[int(caption_of(single[0]["text_tokens"][0, 0]).split()[1])])
  segment = single[0]["segment_ids"][0] == 1
  expected = patches.patchify(packing.leading_crop((first["mean"] - 0.5) / 2.0, (1, 2, 2), 64), (1, 2, 2))[0]
  got = single[0]["tokens"][0][segment]
  assert np.abs(got - expected).max() < 0.3 and not np.allclose(got, expected)


@pytest.mark.parametrize("blocks", [0, 2])
def test_state_saved_by_two_processes_resumes_on_one_without_repeats_or_gaps(tiny_config, tmp_path, blocks):
  from vidsim.models import dit

  tiny_config.dit.segment_blocks = blocks  # 2: one example per half row.
  manifest = write_cache(tmp_path, tiny_config)
  straight, _ = cached_batches(tiny_config, tmp_path, manifest, batches=12)
  aligned = [bool(dit.segments_in_blocks(b["segment_ids"], 2, tiny_config.train.max_segments_per_row)) for b in straight]
  assert all(aligned) if blocks else not all(aligned)
  shares = [cached_batches(tiny_config, tmp_path, manifest, 2, p, batches=5) for p in range(2)]
  states = [json.loads(json.dumps(state)) for _, state in shares]  # As the checkpoint stores them.
  assert states[0] == states[1]
  resumed, _ = cached_batches(tiny_config, tmp_path, manifest, state=states[0], batches=7)
  for got, want in zip(resumed, straight[5:]):
    assert_same_batch(got, want)
  for step in range(5):  # The two processes' rows make the one-process batches.
    assert_same_batch({k: np.concatenate([share[0][step][k] for share in shares]) for k in straight[step]},
                      straight[step])
  seen = [c for step in range(5) for share in shares for c in captions_in(share[0][step])]
  seen += [c for batch in resumed for c in captions_in(batch)]
  # 12 batches take a contiguous run of the stream: every example E or E + 1 times.
  counts = collections.Counter(seen)
  assert len(seen) > 60 and set(counts) == {f"example {i}" for i in range(60)}
  assert max(counts.values()) - min(counts.values()) <= 1


def test_cache_without_shape_index_asks_to_re_encode(tiny_config, tmp_path):
  manifest = write_cache(tmp_path, tiny_config, n=20)
  del manifest["splits"]["train"]["shape_index"]
  with pytest.raises(UsageError, match="no per-example shape index.*re-run `vidsim encode"):
    latents.packed_latents(tiny_config, tmp_path, "train", manifest, seed=0, process_index=0, process_count=1)
