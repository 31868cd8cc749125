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
"""

import collections
import json
import os

import jax
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from flax import nnx, serialization
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vidsim.data import pipeline
from vidsim.errors import UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.models import text as text_lib

log = get_logger("encode")

CACHE_DIR = "latents"


def run_encode(args, config):
  from vidsim.train.loop import job_mesh

  encode_cache(config, args.workdir, job_mesh(config))


def cache_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / CACHE_DIR


def shard_name(split, index, count):
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_cache(config, workdir, mesh):
  from vidsim.train.vae_loop import TrainedVAE

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
      _write_shard_atomically(root / shard_name(split, k, count), records)

  # Everyone's shards exist before process 0 lists them.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vidsim_encode_done")
  if is_chief():
    manifest = _build_manifest(root, config, vae)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
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


def _write_shard_atomically(path: epath.Path, records):
  """Writes to <path>.tmp-<pid>, then renames: a shard either exists whole or not at all."""
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(tmp, path)


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
  splits = {}
  for split in config.encode.splits:
    files = sorted(root.glob(f"{split}-*.array_record"))
    shards, shapes, total = [], collections.Counter(), 0
    for f in files:
      source = ArrayRecordDataSource([str(f)])
      n = len(source)
      for i in range(n):
        shapes["x".join(map(str, read_record(source[i])["mean"].shape))] += 1
      shards.append({"file": f.name, "examples": n})
      total += n
    splits[split] = {"num_examples": total, "shards": shards, "latent_shapes": dict(shapes)}
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


def latent_examples(config, workdir, split, manifest, *, seed, process_index=None, process_count=None):
  """grain MapDataset of this process's latent examples, shuffled per epoch, repeated.

  Each element: latent float32 [t, h, w, c] = (mean + std * eps - shift) / scale with a
  fresh eps per (seed, epoch, index), text_tokens/text_mask, example_id.
  """
  import grain

  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  shift = np.asarray(manifest["latent_shift"], np.float32)
  scale = np.asarray(manifest["latent_scale"], np.float32)
  source = cache_source(workdir, split, manifest)
  if len(source) < process_count:
    raise UsageError(f"latent cache split {split!r} has {len(source)} examples for {process_count} processes")

  def to_example(raw, rng):
    record = read_record(raw)
    eps = rng.standard_normal(record["mean"].shape).astype(np.float32)
    latent = (record["mean"] + record["std"] * eps - shift) / scale
    example = {"latent": latent.astype(np.float32), "example_id": np.int64(record["example_id"])}
    if "text_tokens" in record:
      example["text_tokens"] = np.asarray(record["text_tokens"], np.int32)
      example["text_mask"] = np.asarray(record["text_mask"], bool)
    return example

  dataset = grain.MapDataset.source(source)[process_index::process_count]
  if config.data.shuffle:
    dataset = dataset.shuffle(seed=seed)
  return dataset.repeat().random_map(to_example, seed=seed)
