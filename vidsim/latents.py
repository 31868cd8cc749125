"""The latent cache: `vidsim encode --config F --workdir W` and its reader.

Every split is cut into shards of `encode.examples_per_shard` consecutive examples;
shard k of n is encoded by process k % process_count, on that process's own devices
(no collectives, so processes never wait for each other). A shard is written to a
temporary name and renamed when complete, so a killed job leaves only whole shards
and a restarted one, with any number of processes, skips them: no duplicates, no gaps.

Each record holds the latent MEAN and STD of the VAE posterior (not a sample): the
DiT draws z = mean + std * eps itself, so every epoch sees a fresh sample (the
posterior noise is a free augmentation), and the cache stays reusable. Latents are
stored unnormalised; the manifest carries the VAE's per-channel shift and scale and
the reader applies them.

W/latents/manifest.json lists shards, counts, latent shapes and the fingerprint of
the VAE checkpoint; the DiT refuses a cache whose fingerprint is not the VAE's.
W/latents/<split>-shape-ids.npy gives every example's latent shape (an id into the
manifest's shape_table), so the DiT can plan packed batches in every process without
reading the latents (`packed_latents`).
"""

import collections
import functools
import json
import os

import grain
import jax
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from flax import nnx, serialization
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vidsim import mesh as mesh_lib
from vidsim import text_cache
from vidsim.atomic import write_atomically
from vidsim.data import packing, pipeline
from vidsim.errors import UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.models import text as text_lib
from vidsim.trained import TrainedVAE

log = get_logger("encode")

CACHE_DIR = "latents"


def run_encode(args, config):
  encode_cache(config, args.workdir, mesh_lib.job_mesh(config))


def cache_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / CACHE_DIR


def shard_name(split, index, count):
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_cache(config, workdir, mesh):
  vae = TrainedVAE(config, workdir, mesh)
  root = cache_dir(workdir)
  root.mkdir(parents=True, exist_ok=True)
  _check_or_claim_fingerprint(root, vae)
  encoder = _LocalEncoder(config, vae)

  for split in config.encode.splits:
    source = pipeline.data_source(config, split)
    total = len(source)
    per_shard = config.encode.examples_per_shard
    count = max(1, -(-total // per_shard))
    mine = [k for k in range(count) if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine if not (root / shard_name(split, k, count)).exists()]
    log.info("%s: %d examples, %d shards; this process: %d to encode, %d already done",
             split, total, count, len(todo), len(mine) - len(todo))
    for k in progress(todo, desc=f"encode {split}", unit="shard"):
      indices = range(k * per_shard, min((k + 1) * per_shard, total))
      records = encoder.encode_examples(source, indices)
      write_atomically(root / shard_name(split, k, count), functools.partial(write_records, records=records))

  # Everyone's shards exist before process 0 lists them.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vidsim_encode_done")
  if is_chief():
    manifest = _build_manifest(root, config, vae)
    write_atomically(root / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    log.info("latent cache: %s", ", ".join(f"{s}: {m['num_examples']} examples in {len(m['shards'])} shards"
                                           for s, m in manifest["splits"].items()))
  return root


class _LocalEncoder:
  """Encodes on this process's devices only, batch split over them, weights replicated."""

  def __init__(self, config, vae):
    self.config = config
    self.devices = jax.local_devices()
    self.mesh = Mesh(np.asarray(self.devices), ("batch",))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.params = jax.device_put(vae.params, replicated)
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    graphdef = vae.graphdef

    @jax.jit
    def encode(params, video):
      mean, logvar = jax.tree.map(lambda x: x.astype(np.float32), _encode(graphdef, params, video, config))
      return mean, np.float32(0.5) * logvar

    self._encode = encode

  def encode_examples(self, source, indices):
    """Records for these example indices, in index order."""
    examples = [pipeline.decode_example(source[i], self.config) for i in indices]
    by_shape = collections.defaultdict(list)
    fitted = {}
    for i, example in zip(indices, examples):
      bucket = pipeline.assign_bucket(*example["video"].shape[:3], self.config.data.buckets)
      fitted[i] = pipeline.fit_to_bucket(example["video"], self.config.data.buckets[bucket])
      by_shape[fitted[i].shape].append(i)
    latents = {}
    batch = self.config.encode.batch_size
    for shape, members in by_shape.items():
      for start in range(0, len(members), batch):
        chunk = members[start : start + batch]
        video = np.stack([fitted[i] for i in chunk]).astype(np.float32) / 127.5 - 1.0
        # Pad to a multiple of the local devices with copies of the last clip (dropped below).
        pad = -len(chunk) % len(self.devices)
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)]) if pad else video
        mean, log_std = self._encode(self.params, jax.device_put(video, self.batch_sharding))
        mean, std = np.asarray(mean), np.exp(np.asarray(log_std))
        for j, i in enumerate(chunk):
          latents[i] = (mean[j], std[j])
    records = []
    for i, example in zip(indices, examples):
      mean, std = latents[i]
      record = {
          "mean": mean.astype(np.float32),
          "std": std.astype(np.float32),
          "caption": example["caption"],
          "fps": np.float32(example["fps"]),
          "example_id": np.int64(example["example_id"]),
          "index": np.int64(i),
          "pixel_shape": np.asarray(fitted[i].shape[:3], np.int32),
      }
      if self.config.text.encoder == "bytes":
        ids, mask = text_lib.tokenize_bytes([example["caption"]], self.config.text.max_length)
        record["text_tokens"], record["text_mask"] = ids[0], mask[0]
      records.append(serialization.msgpack_serialize(record))
    return records


def _encode(graphdef, params, video, config):
  model = nnx.merge(graphdef, params)
  return model.encode(video)


def write_records(path, records):
  """ArrayRecord file of serialized records, one record a group (random access)."""
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def _write_npy(path, array):
  with path.open("wb") as f:  # A file object: np.save would append ".npy" to the temporary name.
    np.save(f, array)


def _check_or_claim_fingerprint(root, vae):
  """A cache belongs to one VAE: refuse to mix shards of two different VAEs."""
  claim = root / "vae_fingerprint.json"
  if claim.exists():
    existing = json.loads(claim.read_text())
    if existing["fingerprint"] != vae.fingerprint:
      raise UsageError(
          f"{root} holds latents of another VAE (fingerprint {existing['fingerprint']}, step "
          f"{existing['step']}); this VAE is {vae.fingerprint} (step {vae.step}). "
          f"Delete {root} to re-encode with this VAE."
      )
  elif is_chief():
    claim.write_text(json.dumps({"fingerprint": vae.fingerprint, "step": vae.step}) + "\n")
  # Leftovers of a killed writer are never valid shards.
  for leftover in root.glob("*.tmp-*"):
    if is_chief():
      leftover.unlink()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vidsim_encode_claimed")


def _build_manifest(root, config, vae):
  """The manifest, plus per split a shape index (`<split>-shape-ids.npy`, one id per
  example in cache order into the manifest's `shape_table`) that lets every process
  plan packed batches without reading the latents."""
  splits = {}
  for split in config.encode.splits:
    files = sorted(root.glob(f"{split}-*.array_record"))
    shards, table, ids = [], {}, []
    for f in files:
      source = ArrayRecordDataSource([str(f)])
      n = len(source)
      for i in range(n):
        shape = tuple(int(s) for s in read_record(source[i])["mean"].shape)
        ids.append(table.setdefault(shape, len(table)))
      shards.append({"file": f.name, "examples": n})
    counts = collections.Counter(ids)
    index_name = f"{split}-shape-ids.npy"
    ids = np.asarray(ids, np.uint16 if len(table) < 2**16 else np.int32)
    write_atomically(root / index_name, functools.partial(_write_npy, array=ids))
    splits[split] = {
        "num_examples": len(ids),
        "shards": shards,
        "latent_shapes": {"x".join(map(str, shape)): counts[i] for shape, i in table.items()},
        "shape_table": [list(shape) for shape in table],
        "shape_index": index_name,
    }
  return {
      "vae_fingerprint": vae.fingerprint,
      "vae_step": vae.step,
      "latent_shift": [float(x) for x in vae.shift],
      "latent_scale": [float(x) for x in vae.scale],
      "text_encoder": config.text.encoder,
      "text_max_length": config.text.max_length,
      "splits": splits,
  }


# ------------------------------------------------------------------ reading


def read_record(raw: bytes) -> dict:
  return serialization.msgpack_restore(raw)


def load_manifest(workdir, expected_fingerprint=None) -> dict:
  """The cache manifest; with a fingerprint, refuses a cache made by another VAE."""
  path = cache_dir(workdir) / "manifest.json"
  if not path.exists():
    raise UsageError(f"no latent cache at {path.parent}: run `vidsim encode --config ... --workdir {workdir}` first")
  manifest = json.loads(path.read_text())
  if expected_fingerprint is not None and manifest["vae_fingerprint"] != expected_fingerprint:
    raise UsageError(
        f"latent cache {path.parent} was made by VAE {manifest['vae_fingerprint']} (step {manifest['vae_step']}), "
        f"but the configured VAE is {expected_fingerprint}: re-run `vidsim encode` after deleting {path.parent}"
    )
  return manifest


def cache_source(workdir, split, manifest) -> ArrayRecordDataSource:
  """Random access over a split's records (for grain)."""
  if split not in manifest["splits"]:
    raise UsageError(f"latent cache has no split {split!r}; it has {sorted(manifest['splits'])}")
  root = cache_dir(workdir)
  return ArrayRecordDataSource([str(root / s["file"]) for s in manifest["splits"][split]["shards"]])


def latent_shapes(workdir, split, manifest) -> np.ndarray:
  """int [N, 4] (t, h, w, c) of every latent of a split, in cache order, from the shape index."""
  entry = manifest["splits"].get(split)
  if entry is None:
    raise UsageError(f"latent cache has no split {split!r}; it has {sorted(manifest['splits'])}")
  if "shape_index" not in entry:
    raise UsageError(
        f"the latent cache in {cache_dir(workdir)} has no per-example shape index (made by an older vidsim): "
        f"re-run `vidsim encode --config ... --workdir {workdir}`; it keeps the encoded shards and only "
        "rewrites the manifest and the index"
    )
  with (cache_dir(workdir) / entry["shape_index"]).open("rb") as f:
    ids = np.load(f)
  if len(ids) != entry["num_examples"]:
    raise UsageError(f"shape index of split {split!r} has {len(ids)} entries for {entry['num_examples']} "
                     "examples: re-run `vidsim encode` to rebuild it")
  return np.asarray(entry["shape_table"], np.int64)[ids.astype(np.int64)]


def packed_latents(config, workdir, split, manifest, *, seed, process_index=None, process_count=None):
  """grain IterDataset of this process's packed batches (vidsim/data/packing.py) of a split, repeated.

  Every process plans the same global batches from the shape index and reads only the
  latents of its own rows. Latent = (mean + std * eps - shift) / scale, with eps a pure
  function of (seed, stream position): each epoch draws fresh noise, a resume the same.
  `data.prefetch` batches are prepared ahead by a thread (grain's, which checkpoints the
  position of the last batch handed out, not of the last one prepared).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  shapes = latent_shapes(workdir, split, manifest)
  patch_size, row_tokens = tuple(config.dit.patch_size), config.train.row_tokens
  distinct, inverse = np.unique(shapes, axis=0, return_inverse=True)
  tokens = np.asarray([packing.token_count(s, patch_size, row_tokens) for s in distinct], np.int64)[inverse.ravel()]
  plans = packing.PackPlanIterDataset(
      tokens, rows=config.train.rows_per_batch, row_tokens=row_tokens, slots=config.train.max_segments_per_row,
      seed=seed, shuffle=config.data.shuffle, repeat=True, process_index=process_index, process_count=process_count,
      blocks=packing.plan_blocks(config, tokens))
  text = None
  if config.text.encoder == "precomputed":  # Caption embeddings from `vidsim embed-text`, joined by record index.
    text = text_cache.TextSource(workdir, split, text_cache.load_manifest(workdir, config), manifest)
  capacity = packing.slot_capacity(int(tokens.max(initial=0)), row_tokens)
  batches = plans.map(packing.PackRows(_LatentReader(workdir, split, manifest, seed, text), config, capacity))
  if config.data.prefetch > 0:  # A thread plans and reads the next batches during the step.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.data.prefetch)
  return batches


class _LatentReader:
  """(stream positions, record indices) -> latent examples, read by random access."""

  def __init__(self, workdir, split, manifest, seed, text=None):
    self._source = cache_source(workdir, split, manifest)
    self._text = text  # text_cache.TextSource, or None: the text comes with the latents.
    self._shift = np.asarray(manifest["latent_shift"], np.float32)
    self._scale = np.asarray(manifest["latent_scale"], np.float32)
    self._seed = int(seed)

  def __call__(self, positions, records):
    raws = self._source.__getitems__(records)
    examples = [self._example(read_record(raw), position) for raw, position in zip(raws, positions)]
    if self._text is not None:
      for example, text in zip(examples, self._text(records)):
        example["text_embeddings"], example["text_mask"] = text["text_embeddings"], text["text_mask"]
    return examples

  def _example(self, record, position):
    eps = np.random.default_rng([self._seed, int(position)]).standard_normal(record["mean"].shape, np.float32)
    latent = (record["mean"] + record["std"] * eps - self._shift) / self._scale
    example = {"latent": latent.astype(np.float32), "example_id": np.int64(record["example_id"])}
    if "text_tokens" in record and self._text is None:
      example["text_tokens"] = np.asarray(record["text_tokens"], np.int32)
      example["text_mask"] = np.asarray(record["text_mask"], bool)
    return example
