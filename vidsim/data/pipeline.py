"""grain pipelines over the TFDS ArrayRecord pixel datasets.

    record stream  grain.MapDataset.range(N).shuffle(seed).repeat(): epoch e is
                   shuffled with seed + e, so the order is a pure function of (seed, epoch)
    batch plans    records go to a (frames, height, width) bucket by their stored shape;
                   a bucket's global batch is emitted when full (BatchPlanIterDataset)
    this process   takes its rows [p*B/P, (p+1)*B/P) of each global batch
    load           read the records, decode only the frames kept, crop and resize to the
                   bucket, scale to [-1, 1]
    workers        grain mp_prefetch (config.data.worker_count, config.data.prefetch)

Why plans over the global stream instead of a per-process shard of the records: every
process must emit the SAME bucket at the same step, or the global batch would mix
shapes. Planning reads only each record's shape (cached in `shape_index`), so every
process plans identically and decodes only its own rows; together the processes cover
every record of an epoch exactly once (see tests/test_data_pipeline.py).

The iterator state is a few integers (stream position, pending positions per bucket,
batches planned), so it is JSON and `grain.checkpoint.CheckpointSave` stores it;
a pending (not yet full) bucket is re-read from its positions on restore.
"""

import json
import math
import os

import grain
import numpy as np
from PIL import Image

from vidsim.atomic import write_atomically
from vidsim.data import builder_for, built
from vidsim.data.video_io import decode_image
from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger("data")

# Bucket choice weights: aspect ratio matters most (cropping loses content), then area
# (resizing), then duration (temporal cropping is cheap).
_ASPECT_WEIGHT, _AREA_WEIGHT, _DURATION_WEIGHT = 2.0, 0.5, 0.25


# ------------------------------------------------------------------ source and decoding


def data_source(config, split: str, build: bool = True):
  """Random access to a split (`len()`, `source[i]` -> record dict).

  A missing dataset is built first when its registry entry allows (vidsim.data.built:
  process 0 builds, the others wait), else a UsageError naming `vidsim data prepare`;
  build=False always asks for `vidsim data prepare` instead.
  """
  if build:
    builder = built(config)
  else:
    builder = builder_for(config)
    if not builder.is_prepared():
      raise UsageError(f"dataset {builder.name}/{builder.builder_config.name} is not built in "
                       f"{builder.data_dir_root}: run `vidsim data prepare --config <your config>` first")
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise UsageError(f"split {split!r} not in {builder.name}/{builder.builder_config.name}; valid: {splits}")
  return builder.as_data_source(split)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(record, config=None, frame_range=None) -> dict:
  """A stored record -> dict(video uint8 [T, H, W, 3], caption, fps, example_id, num_frames,
  height, width, source, metadata). frame_range=(start, stop) decodes only those frames."""
  del config  # The schema is the same for every builder; kept for a uniform signature.
  encoded = record["frames"]
  if frame_range is not None:
    encoded = encoded[frame_range[0] : frame_range[1]]
  metadata = _text(record["metadata"])
  return dict(
      video=np.stack([decode_image(f) for f in encoded]),
      caption=_text(record["caption"]),
      fps=float(record["fps"]),
      example_id=int(record["example_id"]),
      num_frames=int(record["num_frames"]),
      height=int(record["height"]),
      width=int(record["width"]),
      source=_text(record["source"]),
      metadata=json.loads(metadata) if metadata else {},
  )


# ------------------------------------------------------------------ buckets


def check_buckets(buckets):
  """config.data.buckets as a list of (frames, height, width) int tuples, validated."""
  out = []
  for b in buckets:
    if len(b) != 3 or any(int(v) < 1 for v in b):
      raise UsageError(f"data.buckets entry {b!r}: expected (frames, height, width) with positive ints")
    out.append(tuple(int(v) for v in b))
  if not out:
    raise UsageError("data.buckets is empty: give at least one (frames, height, width)")
  return out


def assign_bucket(num_frames: int, height: int, width: int, buckets) -> int:
  """Index of the bucket for a clip: images go to 1-frame buckets and videos to video
  buckets when there are any; videos prefer buckets no longer than themselves; then the
  closest by aspect ratio, area and duration (log-ratios, aspect weighted most)."""
  buckets = check_buckets(buckets)
  is_image = num_frames == 1
  candidates = [i for i, b in enumerate(buckets) if (b[0] == 1) == is_image] or list(range(len(buckets)))
  fitting = [i for i in candidates if buckets[i][0] <= num_frames]
  candidates = fitting or candidates
  aspect, area = math.log(width / height), math.log(width * height)

  def cost(i):
    t, h, w = buckets[i]
    return (
        _ASPECT_WEIGHT * abs(aspect - math.log(w / h))
        + _AREA_WEIGHT * abs(area - math.log(w * h))
        + _DURATION_WEIGHT * abs(math.log(num_frames / t))
    )

  return min(candidates, key=cost)


def temporal_window(num_frames: int, bucket_frames: int, rng=None):
  """(start, stop) of the frames a bucket keeps: the first ones, or a random window."""
  if num_frames <= bucket_frames:
    return 0, num_frames
  start = 0 if rng is None else int(rng.integers(0, num_frames - bucket_frames + 1))
  return start, start + bucket_frames


def fit_to_bucket(video: np.ndarray, bucket, rng=None) -> np.ndarray:
  """uint8 [T, H, W, 3] -> uint8 [Tb, Hb, Wb, 3].

  Time: a window of Tb frames (first frames, or random with rng); a shorter clip is
  padded by repeating its last frame. Space: resized keeping the aspect ratio until it
  covers (Hb, Wb), then cropped (centre, or random with rng).
  """
  frames, height, width = bucket
  start, stop = temporal_window(video.shape[0], frames, rng)
  video = video[start:stop]
  if video.shape[0] < frames:
    video = np.concatenate([video, np.repeat(video[-1:], frames - video.shape[0], axis=0)])
  h, w = video.shape[1:3]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  if (new_h, new_w) != (h, w):
    method = Image.BOX if scale < 1 else Image.BICUBIC  # BOX averages when shrinking: no aliasing.
    video = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), method)) for f in video])
  if rng is None:
    top, left = (new_h - height) // 2, (new_w - width) // 2
  else:
    top, left = int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
  return np.ascontiguousarray(video[:, top : top + height, left : left + width])


def bucket_batch_sizes(buckets, batch_size: int, max_multiplier: int, multiple: int = 1):
  """Global batch size per bucket: `batch_size` for the most pixels per clip, more for
  smaller buckets so pixels per batch stay roughly constant, capped at max_multiplier x,
  and always a positive multiple of `multiple`."""
  buckets = check_buckets(buckets)
  pixels = [t * h * w for t, h, w in buckets]
  largest = max(pixels)
  sizes = []
  for p in pixels:
    want = batch_size * min(largest / p, max(1, max_multiplier))
    sizes.append(max(multiple, int(want // multiple) * multiple))
  return sizes


# ------------------------------------------------------------------ shape index


def shape_index(source, cache_path: str = "") -> np.ndarray:
  """int32 [N, 3] (num_frames, height, width) of every record, cached as .npy if a path is given."""
  if cache_path and os.path.exists(cache_path):
    shapes = np.load(cache_path)
    if len(shapes) == len(source):
      return shapes
  shapes = np.zeros((len(source), 3), np.int32)
  chunk = 256
  for start in range(0, len(source), chunk):
    indices = range(start, min(start + chunk, len(source)))
    records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
    for i, r in zip(indices, records):
      shapes[i] = (r["num_frames"], r["height"], r["width"])
  if cache_path:
    try:
      write_atomically(cache_path, lambda tmp: np.save(tmp, shapes))
    except OSError as e:  # A read-only dataset dir only costs a re-scan next time.
      log.warning("could not cache the shape index at %s: %s", cache_path, e)
  return shapes


def split_shape_index(config, split: str, source=None) -> np.ndarray:
  source = source if source is not None else data_source(config, split)
  builder = builder_for(config)
  return shape_index(source, os.path.join(builder.data_dir, f"vidsim-shapes-{split}.npy"))


# ------------------------------------------------------------------ batch plans


def record_order(num_records: int, seed: int, shuffle: bool):
  """Stream position -> record index, infinite; epoch e is shuffled with seed + e."""
  order = grain.MapDataset.range(num_records)
  if shuffle:
    order = order.shuffle(seed=seed)
  return order.repeat()


class BatchPlanIterDataset(grain.IterDataset):
  """Infinite stream of batch plans: {bucket, positions, records} for this process's rows.

  Plans are formed over the global record stream, identically in every process; a
  process keeps rows [p*B/P, (p+1)*B/P). grain's mp_prefetch gives worker i of n the
  plans k with k % n == i (via set_slice).
  """

  def __init__(self, record_buckets, batch_sizes, *, seed, shuffle, process_index, process_count):
    super().__init__()
    self._record_buckets = np.asarray(record_buckets, np.int64)
    self._batch_sizes = list(batch_sizes)
    self._seed, self._shuffle = int(seed), bool(shuffle)
    self._process_index, self._process_count = process_index, process_count
    self._slice = slice(0, None, 1)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    if sequential_slice:
      raise ValueError("BatchPlanIterDataset is infinite: only strided worker slices apply")
    self._slice = sl

  def __iter__(self):
    return _BatchPlanIterator(self)

  def __str__(self):
    return f"BatchPlanIterDataset(batch_sizes={self._batch_sizes}, slice={self._slice})"


class _BatchPlanIterator(grain.DatasetIterator):

  def __init__(self, ds: BatchPlanIterDataset):
    super().__init__()
    self._ds = ds
    self._order = record_order(len(ds._record_buckets), ds._seed, ds._shuffle)
    self._position = 0
    self._pending = [[] for _ in ds._batch_sizes]
    self._planned = 0  # Global batch plans formed so far (kept or skipped by the slice).

  def __next__(self):
    ds = self._ds
    start, step = ds._slice.start or 0, ds._slice.step or 1
    while True:
      position = self._position
      self._position += 1
      bucket = int(ds._record_buckets[self._order[position]])
      self._pending[bucket].append(position)
      if len(self._pending[bucket]) < ds._batch_sizes[bucket]:
        continue
      positions, self._pending[bucket] = self._pending[bucket], []
      index = self._planned
      self._planned += 1
      if index % step != start % step or index < start:
        continue
      per_process = len(positions) // ds._process_count
      mine = np.asarray(positions[ds._process_index * per_process : (ds._process_index + 1) * per_process])
      return dict(
          bucket=bucket,
          positions=mine,
          records=np.asarray([self._order[int(p)] for p in mine], np.int64),
          plan_index=index,
      )

  def get_state(self):
    return dict(position=self._position, pending=[list(p) for p in self._pending], planned=self._planned)

  def set_state(self, state):
    self._position = int(state["position"])
    self._pending = [[int(p) for p in pending] for pending in state["pending"]]
    self._planned = int(state["planned"])


class LoadBatch(grain.transforms.Map):
  """A batch plan -> this process's host-local batch of pixels."""

  def __init__(self, config, split, buckets, *, seed, random_crop):
    self._config, self._split = config, split
    self._buckets = buckets
    self._seed, self._random_crop = int(seed), bool(random_crop)
    self._source = None  # Opened lazily, once per worker process.

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def map(self, plan):
    if self._source is None:
      self._source = data_source(self._config, self._split)
    bucket = self._buckets[plan["bucket"]]
    records = self._source.__getitems__([int(r) for r in plan["records"]])
    videos, captions, fps, ids = [], [], [], []
    for position, record in zip(plan["positions"], records):
      # One generator per stream position: crops differ across epochs, repeat across runs.
      rng = np.random.default_rng([self._seed, int(position)]) if self._random_crop else None
      window = temporal_window(int(record["num_frames"]), bucket[0], rng)
      example = decode_example(record, frame_range=window)
      videos.append(fit_to_bucket(example["video"], bucket, rng))
      captions.append(example["caption"])
      fps.append(example["fps"])
      ids.append(example["example_id"])
    video = np.stack(videos).astype(np.float32) / 127.5 - 1.0
    return dict(
        video=video,
        caption=np.asarray(captions, dtype=object),
        fps=np.asarray(fps, np.float32),
        example_id=np.asarray(ids, np.int64),
        bucket=np.full((len(ids),), plan["bucket"], np.int32),
    )


def pixel_dataset(config, split, *, batch_multiple=1, process_index=None, process_count=None, seed=None):
  """Infinite grain.IterDataset of host-local pixel batches (see the module docstring).

  Batches: video float32 [b, T, H, W, 3] in [-1, 1] (one bucket per batch), caption
  object [b], fps float32 [b], example_id int64 [b], bucket int32 [b]. The global batch
  of a bucket is a multiple of batch_multiple and process_count; b = global / process_count.
  """
  import jax  # Here, not at the top: grain workers import this module and need no jax.

  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  seed = config.seed if seed is None else seed
  if not 0 <= process_index < process_count:
    raise UsageError(f"process_index={process_index} is not in [0, {process_count})")
  buckets = check_buckets(config.data.buckets)
  multiple = math.lcm(max(1, int(batch_multiple)), process_count)
  batch_sizes = bucket_batch_sizes(buckets, config.data.batch_size, config.data.max_batch_multiplier, multiple)

  source = data_source(config, split)
  shapes = split_shape_index(config, split, source)
  record_buckets = np.asarray([assign_bucket(int(t), int(h), int(w), buckets) for t, h, w in shapes])
  counts = np.bincount(record_buckets, minlength=len(buckets))
  for i, n in enumerate(counts):
    if 0 < n < batch_sizes[i]:
      log.warning("bucket %s gets %d clips of %s, fewer than its batch of %d: its batches span epochs",
                  buckets[i], n, split, batch_sizes[i])
  log.info("buckets %s: clips per bucket %s, global batch sizes %s", buckets, counts.tolist(), batch_sizes)

  ds = BatchPlanIterDataset(record_buckets, batch_sizes, seed=seed, shuffle=config.data.shuffle,
                            process_index=process_index, process_count=process_count)
  ds = ds.map(LoadBatch(config, split, buckets, seed=seed, random_crop=config.data.random_crop))
  if config.data.worker_count > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; vidsim uses argparse.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count, per_worker_buffer_size=max(1, config.data.prefetch)))
  return ds
