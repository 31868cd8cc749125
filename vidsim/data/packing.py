"""NaViT-style packing: latent grids of any shape -> fixed-length rows of patch tokens.

Examples are dicts with `latent` float32 [t, h, w, c] (already normalised) and
`text_tokens` int32 [S] + `text_mask` bool [S], or `text_embeddings` float32 [S, E] +
`text_mask`. Each is cropped to fit a row and patchified; per-segment features (text,
frame count) go into K slots, so slot k of a row always belongs to segment k + 1.

    plan      one GLOBAL stream of example positions (epoch e a permutation seeded by
              (seed, e), EpochOrder); first-fit over the R = train.rows_per_batch rows
              of a batch, using only each example's token count (known from its shape);
              a batch closes when the next example fits no row, and the next batch
              starts with it (PackPlanIterDataset). With dit.segment_blocks = n > 1 and
              every example at most L/n tokens, each row is n blocks of L/n tokens with
              one example each (`plan_blocks`), so every batch takes the DiT's blocked
              path (vidsim/models/dit.py)
    this process   takes rows [p*R/P, (p+1)*R/P) of each planned batch
    load      reads only those rows' examples, patchifies them and lays the rows out

Every process plans the same batches, so the iterator state is one number, the
stream position of the next batch's first example: the same in every process, and a
restore onto any process count recomputes the plan from it (no example of the epoch
repeated or skipped). grain's FirstFitPackIterDataset is not used because its state
is per process and it packs from the full features, which would make every process
read every latent.

Host-local batch (R/P rows, L = train.row_tokens tokens, K = train.max_segments_per_row,
S = text.max_length):
  tokens          float32 [R/P, L, P]   clean latent patches (P = pt*ph*pw*c)
  positions       int32   [R/P, L, 3]   (t, h, w) of the patch in its sample's patch grid
  segment_ids     int32   [R/P, L]      1..K per sample, 0 for padding
  segment_frames  int32   [R/P, K]      patch-grid frames of segment k+1 (0 = empty slot)
  text_tokens     int32   [R/P, K, S]   caption bytes + 1, 0 = padding   (text.encoder=bytes)
  text_embeddings float32 [R/P, K, S, E]                                  (text.encoder=precomputed)
  text_mask       bool    [R/P, K, S]   valid text positions
  slot_tokens     int32   [R/P, K, M]   row positions of segment k+1's tokens, -1 past
                                        its end; only when M (the data's largest
                                        sample, in tokens) <= L/2: `slot_capacity`
Example ids and other keys are dropped. `packing_efficiency(batch)` is the share of
real tokens, which the train loop logs.

Crop rule: a sample with more tokens than a row keeps its LEADING whole patch frames,
as many as fit. Leading, not random, because the causal VAE encodes the first frame
alone: a crop that starts later would begin with a latent the decoder never sees
first. Frames are also cut to a multiple of pt. Images never need cropping; a single
frame larger than a row is a UsageError.
"""

import grain
import numpy as np

from vidsim import patches
from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger(__name__)

# Per-segment text features of each text encoder (K slots per row).
_TEXT_FEATURES = {"bytes": ("text_tokens", "text_mask"), "precomputed": ("text_embeddings", "text_mask")}
TEXT_KEYS = ("text_tokens", "text_embeddings", "text_mask")
# The keys of a packed batch that go to the devices (the model and the loss read them).
MODEL_KEYS = ("tokens", "positions", "segment_ids", "segment_frames", "slot_tokens") + TEXT_KEYS


def slot_capacity(max_sample_tokens: int, row_tokens: int) -> int:
  """M for `slot_tokens`, or 0 for none. With it the DiT's cross-attention runs per
  caption slot, M queries against that slot's S keys, instead of every token of the row
  against all K x S keys (vidsim/models/dit.py): at most half the attention scores when
  M <= L/2. The K x M gathered queries cost memory traffic of their own; at the demo and
  quality shapes the step is 11-18% faster (docs/benchmarks.md, "Per-slot cross-attention")."""
  return int(max_sample_tokens) if 0 < max_sample_tokens <= row_tokens // 2 else 0


def slot_positions(segment_ids, slots: int, capacity: int):
  """`slot_tokens` [R, K, capacity] of a packed batch's segment_ids [R, L]: the row
  positions of segment k+1's tokens, -1 past its end."""
  out = np.full(segment_ids.shape[:1] + (slots, capacity), -1, np.int32)
  for r, row in enumerate(segment_ids):
    for k in range(slots):
      where = np.flatnonzero(row == k + 1)
      if len(where) > capacity:
        raise ValueError(f"a segment of {len(where)} tokens exceeds slot capacity {capacity}: "
                         "the capacity must be the data's largest sample")
      out[r, k, : len(where)] = where
  return out


def model_inputs(host_batch) -> dict:
  """The device-bound arrays of a host batch (MODEL_KEYS that are present)."""
  return {k: host_batch[k] for k in MODEL_KEYS if k in host_batch}


def text_inputs(batch) -> dict:
  """The text features of a batch, whichever text encoder made them: the model's `text` argument."""
  return {k: batch[k] for k in TEXT_KEYS if k in batch}


def kept_patch_frames(shape, patch_size, row_tokens: int):
  """(patch frames kept by the crop rule, tokens per patch frame) of a latent of `shape` (t, h, w, c)."""
  t, h, w = (int(s) for s in shape[:3])
  pt = patch_size[0]
  _, grid_h, grid_w = patches.patch_grid_shape((pt, h, w), patch_size)  # Checks h, w.
  per_frame = grid_h * grid_w
  if per_frame > row_tokens:
    raise UsageError(
        f"a latent frame of shape {tuple(shape[1:])} makes {per_frame} tokens with dit.patch_size "
        f"{tuple(patch_size)}, more than train.row_tokens={row_tokens}: raise row_tokens to at least "
        f"{per_frame} or use smaller frames"
    )
  if t < pt:
    patches.patch_grid_shape((t, h, w), patch_size)  # Raises, naming the nearest valid sizes.
  return min(t // pt, row_tokens // per_frame), per_frame


def token_count(shape, patch_size, row_tokens: int) -> int:
  """Tokens a latent of `shape` takes in a row, after the crop rule: what the planner packs."""
  frames, per_frame = kept_patch_frames(shape, tuple(patch_size), row_tokens)
  return frames * per_frame


def leading_crop(latent, patch_size, row_tokens: int):
  """Keeps the leading whole patch frames of `latent` [t, h, w, c] that fit in row_tokens (see crop rule)."""
  frames, _ = kept_patch_frames(latent.shape, tuple(patch_size), row_tokens)
  keep = frames * patch_size[0]
  return latent if keep == latent.shape[0] else latent[:keep]


def _packable(example, *, config):
  """One example -> one segment's features: tokens, positions, segment_frames [1], text [1, ...]."""
  latent = np.asarray(_latent(example), np.float32)
  patch_size = tuple(config.dit.patch_size)
  tokens, positions = patches.patchify(leading_crop(latent, patch_size, config.train.row_tokens), patch_size)
  out = dict(tokens=tokens, positions=positions)
  out["segment_frames"] = np.asarray([positions[-1, 0] + 1], np.int32)
  out.update(_segment_text(example, config))
  return out


def _latent(example):
  if "latent" not in example:
    raise UsageError(f"latent example has no 'latent' key; keys: {sorted(example)}")
  latent = example["latent"]
  if np.ndim(latent) != 4:
    raise UsageError(f"example 'latent' must be [t, h, w, c], got shape {np.shape(latent)}")
  return latent


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


# ------------------------------------------------------------------ the global plan


def plan_blocks(config, record_tokens) -> int:
  """Blocks per row for the planner: dit.segment_blocks = n when it applies to every
  example (n > 1, L % n == 0, each example at most L/n tokens, K >= n), else 1 (plain
  first-fit, logged when n was asked for).

  Aligned blocks hold one example each, so the DiT runs every batch as R x n rows of
  L/n tokens, each attending to its own caption only (its blocked path). First-fit over
  whole rows puts clips of unequal lengths across block boundaries, and those batches
  take the general path: the L x L square of each row and a caption slot per segment
  per block. A block holds one example however short it is: an image of 16 tokens in a
  48-token block leaves 32 as padding, which the blocked path still computes.
  """
  n = int(config.dit.get("segment_blocks", 0))
  if n <= 1:
    return 1
  reason = _blocks_problem(n, config.train.row_tokens, config.train.max_segments_per_row, record_tokens)
  if reason:
    log.info("packing: first-fit over whole rows, not one example per block: %s; batches take the "
             "DiT's blocked path only where they happen to be aligned", reason)
    return 1
  return n


def _blocks_problem(n, row_tokens, slots, record_tokens):
  """Why n blocks a row of one example each cannot hold these examples, or None."""
  largest = int(np.max(record_tokens, initial=0))
  if row_tokens % n:
    return f"train.row_tokens={row_tokens} is not a multiple of dit.segment_blocks={n}"
  if largest > row_tokens // n:
    return f"the largest example has {largest} tokens, more than a block of {row_tokens // n}"
  if slots < n:
    return f"train.max_segments_per_row={slots} is less than dit.segment_blocks={n}"
  return None


def plan_batch(order, record_tokens, position: int, *, rows: int, row_tokens: int, slots: int, end=None):
  """First-fit of the stream from `position` into one batch of `rows` rows.

  order: stream position -> record index; record_tokens: record index -> tokens.
  Returns (members, next_position): members[r] lists the stream positions in row r,
  next_position is the first example that fit no row (the next batch starts there).
  With `end` (a finite stream), returns (None, end) if the stream ends first.
  """
  rows_room = _RowsRoom(rows, row_tokens, slots)
  members = [[] for _ in range(rows)]
  while end is None or position < end:
    row = rows_room.first_fit(int(record_tokens[order[position]]))
    if row is None:
      return members, position
    members[row].append(position)
    position += 1
  return None, end


class _RowsRoom:
  """The free tokens of each row (-1 once its slots are used up) in a max-tree, so the
  first row with room for n tokens is found in O(log rows): a pod batch has thousands
  of rows, where a linear scan per example costs most of a step."""

  def __init__(self, rows, row_tokens, slots):
    self._leaves = 1 << max(rows - 1, 0).bit_length()
    self._room = [-1] * (2 * self._leaves)
    self._room[self._leaves : self._leaves + rows] = [row_tokens] * rows
    for node in range(self._leaves - 1, 0, -1):
      self._room[node] = max(self._room[2 * node], self._room[2 * node + 1])
    self._slots_left = [slots] * rows

  def first_fit(self, tokens):
    """Places `tokens` in the first row with room and a free slot; returns it, or None."""
    room = self._room
    if room[1] < tokens:
      return None
    node = 1
    while node < self._leaves:
      node = 2 * node if room[2 * node] >= tokens else 2 * node + 1
    row = node - self._leaves
    self._slots_left[row] -= 1
    room[node] = room[node] - tokens if self._slots_left[row] else -1
    node //= 2
    while node:
      room[node] = max(room[2 * node], room[2 * node + 1])
      node //= 2
    return row


class EpochOrder:
  """Stream position -> record index, infinite: epoch e is a permutation seeded by (seed, e).

  One numpy permutation per epoch rather than grain's per-index shuffle: a lookup there
  costs 7-25 us, and every process plans about 10^4 examples per batch on a pod.
  """

  def __init__(self, num_records: int, seed: int, shuffle: bool):
    self._num_records, self._seed, self._shuffle = int(num_records), int(seed), bool(shuffle)
    # The last two epochs: a batch across an epoch boundary looks up both, row by row,
    # and must not rebuild a permutation at every switch.
    self._epochs = {}

  def __getitem__(self, position: int) -> int:
    epoch, index = divmod(int(position), self._num_records)
    if epoch not in self._epochs:
      if len(self._epochs) == 2:
        del self._epochs[min(self._epochs)]
      self._epochs[epoch] = (np.random.default_rng([self._seed, epoch]).permutation(self._num_records)
                             if self._shuffle else np.arange(self._num_records))
    return int(self._epochs[epoch][index])


class PackPlanIterDataset(grain.IterDataset):
  """Stream of this process's share of globally planned packed batches (module docstring).

  Elements: dict(start=first stream position of the batch, rows=[[(position, record,
  tokens), ...] per row of this process], block_tokens=0, or L/blocks where each row is
  `blocks` blocks with the i-th example of the row at the start of block i).
  State: {"position": next batch's start}.
  """

  def __init__(self, record_tokens, *, rows, row_tokens, slots, seed, shuffle, repeat, process_index, process_count,
               blocks=1):
    super().__init__()
    self.record_tokens = np.asarray(record_tokens, np.int64)
    if self.record_tokens.size == 0:
      raise UsageError("no examples to pack")
    if self.record_tokens.max() > row_tokens:
      raise UsageError(f"an example of {self.record_tokens.max()} tokens exceeds train.row_tokens={row_tokens}")
    if slots < 1:
      raise UsageError(f"train.max_segments_per_row must be >= 1, got {slots}")
    if rows < 1 or rows % process_count:
      raise UsageError(f"train.rows_per_batch={rows} must be a positive multiple of the process count {process_count}")
    if not 0 <= process_index < process_count:
      raise UsageError(f"process_index={process_index} is not in [0, {process_count})")
    problem = blocks > 1 and _blocks_problem(blocks, row_tokens, slots, self.record_tokens)
    if problem:
      raise ValueError(f"{blocks} blocks per row do not apply to these examples ({problem}): use plan_blocks")
    self.rows, self.row_tokens, self.slots, self.blocks = rows, row_tokens, slots, int(blocks)
    self.seed, self.shuffle, self.repeat = int(seed), bool(shuffle), bool(repeat)
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self):
    return _PackPlanIterator(self)

  def __str__(self):
    return (f"PackPlanIterDataset(rows={self.rows}, row_tokens={self.row_tokens}, slots={self.slots}, "
            f"blocks={self.blocks})")


class _PackPlanIterator(grain.DatasetIterator):

  def __init__(self, ds: PackPlanIterDataset):
    super().__init__()
    self._ds = ds
    self._order = EpochOrder(len(ds.record_tokens), ds.seed, ds.shuffle)
    self._end = None if ds.repeat else len(ds.record_tokens)
    self._position = 0

  def __next__(self):
    ds = self._ds
    n = ds.blocks
    # Blocks: first-fit over R x n sub-rows of one example each; sub-row j is block j % n
    # of row j // n. A batch closes only when every block is taken.
    members, next_position = plan_batch(self._order, ds.record_tokens, self._position, rows=ds.rows * n,
                                        row_tokens=ds.row_tokens // n, slots=ds.slots if n == 1 else 1,
                                        end=self._end)
    if members is None:  # A finite stream ended inside a batch: drop the partial batch.
      raise StopIteration
    if n > 1:
      members = [sum(members[r * n : (r + 1) * n], []) for r in range(ds.rows)]
    start, self._position = self._position, next_position
    share = ds.rows // ds.process_count
    mine = members[ds.process_index * share : (ds.process_index + 1) * share]
    rows = []
    for row in mine:
      records = [int(self._order[p]) for p in row]
      rows.append([(p, r, int(ds.record_tokens[r])) for p, r in zip(row, records)])
    return dict(start=start, rows=rows, block_tokens=ds.row_tokens // n if n > 1 else 0)

  def get_state(self):
    return {"position": self._position}

  def set_state(self, state):
    if "position" not in state:
      raise UsageError(
          f"this data iterator state ({sorted(state)}) is not a packed-latent stream position: it was saved "
          "by the per-process packer of an older vidsim. Start the DiT stage in a new workdir, or load only "
          "its weights with --config.init_from"
      )
    self._position = int(state["position"])


# ------------------------------------------------------------------ rows of this process


class PackRows(grain.transforms.Map):
  """A plan -> this process's host-local packed batch. `read(positions, records)` returns
  the examples of those stream positions (it may draw per-position noise)."""

  def __init__(self, read, config, capacity: int = 0):
    self._read, self._config, self._capacity = read, config, capacity

  def map(self, plan):
    flat = [entry for row in plan["rows"] for entry in row]
    examples = self._read([p for p, _, _ in flat], [r for _, r, _ in flat])
    segments = [_packable(e, config=self._config) for e in examples]
    for (position, record, planned), segment in zip(flat, segments):
      if len(segment["tokens"]) != planned:
        raise UsageError(
            f"example {record} (stream position {position}) has {len(segment['tokens'])} tokens but its "
            f"shape index says {planned}: the shape index does not match the data (re-run `vidsim encode`)"
        )
    rows, at = [], 0
    for row in plan["rows"]:
      rows.append(segments[at : at + len(row)])
      at += len(row)
    return layout_rows(rows, self._config, self._capacity, block_tokens=plan.get("block_tokens", 0))


def layout_rows(rows, config, capacity: int = 0, block_tokens: int = 0):
  """Lists of segments (from _packable) per row -> the host batch format (module docstring);
  with `slot_tokens` [R, K, capacity] when capacity > 0 (`slot_capacity`). Segments follow
  each other, or with block_tokens > 0 the k-th starts at k * block_tokens."""
  row_tokens, slots = config.train.row_tokens, config.train.max_segments_per_row
  first = rows[0][0]
  batch = {
      "tokens": np.zeros((len(rows), row_tokens, first["tokens"].shape[1]), np.float32),
      "positions": np.zeros((len(rows), row_tokens, 3), np.int32),
      "segment_ids": np.zeros((len(rows), row_tokens), np.int32),
  }
  for name in ("segment_frames",) + _TEXT_FEATURES[config.text.encoder]:
    value = first[name]
    batch[name] = np.zeros((len(rows), slots) + value.shape[1:], value.dtype)
  for r, segments in enumerate(rows):
    at = 0
    for k, segment in enumerate(segments):
      n = len(segment["tokens"])
      if block_tokens:
        at = k * block_tokens
      batch["tokens"][r, at : at + n] = segment["tokens"]
      batch["positions"][r, at : at + n] = segment["positions"]
      batch["segment_ids"][r, at : at + n] = k + 1
      at += n
      for name, value in batch.items():
        if name not in ("tokens", "positions", "segment_ids"):
          value[r, k] = segment[name][0]
  if capacity:
    batch["slot_tokens"] = slot_positions(batch["segment_ids"], slots, capacity)
  return batch


def packed_dataset(examples, config, *, process_index=0, process_count=1, seed=0, shuffle=False, repeat=False):
  """grain IterDataset of host-local packed batches from an in-memory sequence of examples.

  Reads every example's shape up front, so it is for examples already in memory (tests,
  small jobs); the latent cache uses `latents.packed_latents`, which reads shapes from
  the cache's index. Without repeat, one pass in order; the last partial batch is dropped.
  """
  patch_size, row_tokens = tuple(config.dit.patch_size), config.train.row_tokens
  tokens = [token_count(np.shape(_latent(examples[i])), patch_size, row_tokens) for i in range(len(examples))]
  plans = PackPlanIterDataset(
      tokens, rows=config.train.rows_per_batch, row_tokens=row_tokens, slots=config.train.max_segments_per_row,
      seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
      blocks=plan_blocks(config, tokens))
  capacity = slot_capacity(max(tokens, default=0), row_tokens)
  return plans.map(PackRows(lambda positions, records: [examples[r] for r in records], config, capacity))


def packing_efficiency(batch) -> float:
  """Real tokens / all tokens of a packed batch (1.0 = no padding)."""
  segment_ids = np.asarray(batch["segment_ids"])
  return float(np.count_nonzero(segment_ids)) / segment_ids.size
