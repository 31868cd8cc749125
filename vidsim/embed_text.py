"""`vidsim embed-text --config F --workdir W`: caption embeddings of a frozen T5 / UMT5 into the cache.

Reads the captions of every example of the latent cache (`vidsim encode` first), embeds them with
the encoder of text.t5_path (vidsim/models/t5_loader.py; params sharded over the mesh by their
logical names, text.t5_dtype) and writes one text shard per latent shard (vidsim/text_cache.py).

Shards are written under a temporary name and renamed when complete, so a killed run leaves
whole shards and a rerun, with any number of processes, embeds only the rest. With several
processes the encoder's params span every process's devices, so every embedding call is a
collective: processes go through the shards still to do in rounds (round r: shard r * P + p
for process p), each round with the same number of calls, and each writes its own shards.
"""

import functools
import json

import jax
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from flax import serialization
from jax.experimental import multihost_utils

from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim import text_cache
from vidsim.atomic import write_atomically
from vidsim.errors import UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.models import t5_loader

log = get_logger("embed-text")


def run_embed_text(args, config):
  t5_loader.check_directory(config.text.t5_path)  # Before any model or cache is touched: exit 2 names what is missing.
  embed_cache(config, args.workdir, mesh_lib.job_mesh(config))


def embed_cache(config, workdir, mesh):
  """Embeds every caption of the latent cache in `workdir`; returns the text manifest."""
  t5_loader.check_directory(config.text.t5_path)
  latent_manifest = latents_lib.load_manifest(workdir)
  root = text_cache.text_dir(workdir)
  root.mkdir(parents=True, exist_ok=True)
  encoder = t5_loader.load_text_encoder(config, mesh)
  described = encoder.describe()
  _claim(root, described)
  batch = int(config.text.embed_batch_size)
  if batch < 1:
    raise UsageError(f"text.embed_batch_size must be >= 1, got {batch}")

  processes, me = jax.process_count(), jax.process_index()
  for split, entry in latent_manifest["splits"].items():
    todo = [s for s in entry["shards"] if not (root / s["file"]).exists()]
    if processes > 1:  # Everyone has listed the shards to do before anyone writes one.
      multihost_utils.sync_global_devices(f"vidsim_embed_text_listed_{split}")
    log.info("%s: %d examples in %d shards; %d shards to embed, %d already done", split,
             entry["num_examples"], len(entry["shards"]), len(todo), len(entry["shards"]) - len(todo))
    rounds = [todo[r : r + processes] for r in range(0, len(todo), processes)]
    for shards in progress(rounds, desc=f"embed-text {split}", unit="round"):
      calls = max(-(-s["examples"] // batch) for s in shards)  # The same in every process.
      mine = shards[me] if me < len(shards) else None
      captions, indices = _captions(latents_lib.cache_dir(workdir) / mine["file"]) if mine else ([], [])
      embedded = []
      for call in range(calls):
        chunk = captions[call * batch : (call + 1) * batch]
        embeddings, mask = encoder.embed_local(chunk + [""] * (batch - len(chunk)))
        embedded += [e[m] for e, m in zip(embeddings[: len(chunk)], mask[: len(chunk)])]
      if mine:
        records = [serialization.msgpack_serialize({"index": np.int64(i), "caption": c, "text_embeddings": e})
                   for i, c, e in zip(indices, captions, embedded)]
        write_atomically(root / mine["file"], functools.partial(latents_lib.write_records, records=records))

  if processes > 1:
    multihost_utils.sync_global_devices("vidsim_embed_text_done")
  manifest = {"encoder": described, "splits": {
      split: {"num_examples": entry["num_examples"],
              "shards": [{"file": s["file"], "examples": s["examples"]} for s in entry["shards"]]}
      for split, entry in latent_manifest["splits"].items()}}
  if is_chief():
    write_atomically(root / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    log.info("caption embeddings (%s, %d x %d per caption) for %s in %s", described["kind"], described["max_length"],
             described["embed_dim"], ", ".join(f"{s}: {m['num_examples']}" for s, m in manifest["splits"].items()), root)
  return manifest


def _captions(path):
  """(captions, example indices) of one latent shard, in record order."""
  source = ArrayRecordDataSource([str(path)])
  records = [latents_lib.read_record(raw) for raw in source.__getitems__(list(range(len(source))))]
  return [str(r["caption"]) for r in records], [int(r["index"]) for r in records]


def _claim(root, described):
  """A text cache belongs to one encoder at one caption length: refuse to mix shards of two."""
  claim = root / "encoder.json"
  if claim.exists():
    existing = json.loads(claim.read_text())
    same = all(existing[k] == described[k] for k in ("fingerprint", "max_length", "dtype"))
    if not same:
      raise UsageError(
          f"{root} holds caption embeddings of the {existing['kind']} encoder {existing['fingerprint']} "
          f"({existing['path']}, {existing['max_length']} tokens, {existing['dtype']}); this one is "
          f"{described['fingerprint']} ({described['path']}, {described['max_length']} tokens, {described['dtype']}). "
          f"Delete {root} to embed with this encoder."
      )
  elif is_chief():
    claim.write_text(json.dumps(described, indent=2) + "\n")
  for leftover in root.glob("*.tmp-*"):  # A killed writer's leftovers are never valid shards.
    if is_chief():
      leftover.unlink()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vidsim_embed_text_claimed")
