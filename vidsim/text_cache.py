"""Caption embeddings of a frozen text encoder, cached beside the latent cache (W/latents/text/).

`vidsim embed-text` (vidsim/embed_text.py) writes, for every shard of the latent cache, a text
shard of the same name holding the same examples in the same order, so record i of a split is
the same example in both and the DiT's reader joins them by index:

  W/latents/text/<split>-<k>-of-<n>.array_record   per example: index, caption, text_embeddings
                                                   float32 [n, E] (its n valid tokens only)
  W/latents/text/encoder.json                      the encoder that claimed the directory
  W/latents/text/manifest.json                     that encoder and, per split, the shards

The latent cache itself is untouched, so one VAE's latents serve any text encoder. A directory
belongs to one encoder (its fingerprint, vidsim/models/t5_loader.py): embedding with another,
or training with text.t5_path naming another, is refused, since sampling embeds new prompts
with text.t5_path and must see what training saw.
"""

import json

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath
from flax import serialization

from vidsim.errors import UsageError
from vidsim.models import t5_loader

# Under the latent cache's directory (vidsim/latents.py CACHE_DIR, which imports this module).
LATENTS_DIR, TEXT_DIR = "latents", "text"


def text_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / LATENTS_DIR / TEXT_DIR


def read_record(raw: bytes) -> dict:
  return serialization.msgpack_restore(raw)


def load_manifest(workdir, config) -> dict:
  """The text cache's manifest, after checking it fits config.text (length, size, encoder)."""
  root = text_dir(workdir)
  path = root / "manifest.json"
  if not path.exists():
    raise UsageError(
        f"text.encoder='precomputed' reads caption embeddings from {root}, which has none: run "
        f"`vidsim embed-text --config ... --workdir {workdir}` (after `vidsim encode`) with text.t5_path set"
    )
  manifest = json.loads(path.read_text())
  check_encoder(manifest["encoder"], config, root)
  return manifest


def check_encoder(cached: dict, config, root):
  """Refuses cached embeddings that config.text would not reproduce."""
  t = config.text
  if int(t.max_length) != cached["max_length"]:
    raise UsageError(f"caption embeddings in {root} have {cached['max_length']} tokens per caption; "
                     f"text.max_length is {t.max_length}: set it to {cached['max_length']} or re-run embed-text")
  if t.embed_dim and int(t.embed_dim) != cached["embed_dim"]:
    raise UsageError(f"caption embeddings in {root} have size {cached['embed_dim']}; text.embed_dim is "
                     f"{t.embed_dim}: set it to 0 (read from the cache) or {cached['embed_dim']}")
  if t.t5_path:
    current = t5_loader.fingerprint(t5_loader.check_directory(t.t5_path))
    if current != cached["fingerprint"]:
      raise UsageError(
          f"caption embeddings in {root} were made by the {cached['kind']} encoder {cached['fingerprint']} "
          f"({cached['path']}), but text.t5_path {t.t5_path} is encoder {current}: prompts would be embedded by "
          f"another encoder than the one the DiT learns from. Point text.t5_path at {cached['path']}, or delete "
          f"{root} and re-run `vidsim embed-text`"
      )


def resolve_embed_dim(config, manifest):
  """Sets config.text.embed_dim (0 = not set) to the cached embeddings' size."""
  if not config.text.embed_dim:
    config.text.embed_dim = int(manifest["encoder"]["embed_dim"])


class TextSource:
  """Record indices of a split (the latent cache's order) -> text features of those examples:
  text_embeddings float32 [S, E] (zeros past the caption) and text_mask bool [S]."""

  def __init__(self, workdir, split, manifest, latent_manifest):
    root = text_dir(workdir)
    entry = manifest["splits"].get(split)
    if entry is None:
      raise UsageError(f"caption embeddings in {root} have no split {split!r}; they have {sorted(manifest['splits'])}: "
                       "re-run `vidsim embed-text`")
    latent_shards = [(s["file"], s["examples"]) for s in latent_manifest["splits"][split]["shards"]]
    if [(s["file"], s["examples"]) for s in entry["shards"]] != latent_shards:
      raise UsageError(f"caption embeddings in {root} follow another latent cache than {root.parent} "
                       f"(split {split!r} shards differ): delete {root} and re-run `vidsim embed-text`")
    self._source = ArrayRecordDataSource([str(root / s["file"]) for s in entry["shards"]])
    self._length = int(manifest["encoder"]["max_length"])
    self._dim = int(manifest["encoder"]["embed_dim"])

  def __call__(self, records):
    """A list of dicts (index, text_embeddings, text_mask), one per record index."""
    out = []
    for raw in self._source.__getitems__(list(records)):
      record = read_record(raw)
      valid = np.asarray(record["text_embeddings"], np.float32)
      embeddings = np.zeros((self._length, self._dim), np.float32)
      embeddings[: len(valid)] = valid
      out.append({"index": int(record["index"]), "text_embeddings": embeddings,
                  "text_mask": np.arange(self._length) < len(valid)})
    return out
