"""A frozen T5 / UMT5 encoder and its tokenizer from a local Hugging Face model directory.

    encoder = load_text_encoder(config, mesh)      # config.text.t5_path, t5_dtype, max_length
    embeddings, mask = encoder.embed(["a red 3 moves right", ...])   # float32 [N, S, E], bool [N, S]

The directory (nothing is ever downloaded) must hold:
- config.json (model_type t5, mt5 or umt5);
- the weights as safetensors: model.safetensors, or the shards model.safetensors.index.json lists
  (any other *.safetensors files are read when there is neither);
- a tokenizer: tokenizer.json (the `tokenizers` library; preferred, as transformers' fast
  tokenizer) or spiece.model (SentencePiece).
Full encoder-decoder checkpoints load too: their decoder.* and lm_head.* tensors are skipped.
Every other tensor is mapped by name; a checkpoint with missing, unexpected or wrongly shaped
tensors is refused with the three lists (UsageError, exit 2).

Parameters are placed on the mesh by their logical names (config.mesh.rules), so an encoder
larger than one device's memory is sharded like the DiT; captions are split over the batch axes.
"""

import functools
import hashlib
import json

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open

from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.models import layers
from vidsim.models import t5 as t5_lib

log = get_logger("t5")

CONTENTS = (
    "config.json, the weights as model.safetensors or as shards listed in model.safetensors.index.json, "
    "and a tokenizer: tokenizer.json or spiece.model"
)
INDEX = "model.safetensors.index.json"
# Tensors of a full encoder-decoder checkpoint that an encoder does not use.
SKIPPED_PREFIXES = ("decoder.", "lm_head.")
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # The same (tied) table, either name.
LISTED = 20  # Names shown per list in a refusal; the count says how many more.


def check_directory(path) -> epath.Path:
  """The directory, or a UsageError saying what a T5/UMT5 directory must contain."""
  if not path:
    raise UsageError(f"text.t5_path is empty: set it to a local Hugging Face T5/UMT5 directory holding {CONTENTS}")
  directory = epath.Path(path)
  if not directory.is_dir():
    raise UsageError(f"text.t5_path {path} is not a directory; it must hold {CONTENTS}")
  if not (directory / "config.json").exists():
    raise UsageError(f"{path} has no config.json; a T5/UMT5 directory must hold {CONTENTS}")
  weight_files(directory)
  tokenizer_file(directory)
  return directory


def weight_files(directory) -> list:
  """The safetensors files of the model: the index's shards, model.safetensors, or every *.safetensors."""
  directory = epath.Path(directory)
  index = directory / INDEX
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    absent = [s for s in shards if not (directory / s).exists()]
    if absent:
      raise UsageError(f"{index} lists shards that are not in {directory}: {absent}")
    return [directory / s for s in shards]
  if (directory / "model.safetensors").exists():
    return [directory / "model.safetensors"]
  found = sorted(directory.glob("*.safetensors"))
  if not found:
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = f" (it has {others}: convert them to safetensors)" if others else ""
    raise UsageError(f"{directory} has no *.safetensors weights{hint}; a T5/UMT5 directory must hold {CONTENTS}")
  return found


def tokenizer_file(directory) -> epath.Path:
  directory = epath.Path(directory)
  for name in ("tokenizer.json", "spiece.model"):
    if (directory / name).exists():
      return directory / name
  raise UsageError(f"{directory} has no tokenizer (tokenizer.json or spiece.model); it must hold {CONTENTS}")


# ------------------------------------------------------------------ tokenizer


class Tokenizer:
  """Captions -> (ids int32 [N, S], mask bool [N, S]) as transformers' T5 tokenizers make them:
  the pieces, then </s>; longer captions are cut to S - 1 pieces and keep their </s>; pad id 0."""

  def __init__(self, directory):
    self.path = tokenizer_file(directory)
    if self.path.name == "tokenizer.json":
      import tokenizers  # Imported here: only tokenizer.json directories need it.

      self._fast = tokenizers.Tokenizer.from_file(str(self.path))
      self._fast.no_truncation()
      self._fast.no_padding()
      self.eos_id = self._fast.token_to_id("</s>")
      self.pad_id = self._fast.token_to_id("<pad>")
      if self.eos_id is None:
        raise UsageError(f"{self.path} has no '</s>' token: not a T5 tokenizer")
    else:
      import sentencepiece  # Imported here: only spiece.model directories need it.

      self._fast = None
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
      self.eos_id, self.pad_id = self._sp.eos_id(), self._sp.pad_id()
      if self.eos_id < 0:
        raise UsageError(f"{self.path} defines no end-of-sequence piece: not a T5 SentencePiece model")
    self.pad_id = 0 if self.pad_id is None or self.pad_id < 0 else self.pad_id

  def pieces(self, caption: str) -> list:
    """The token ids of one caption, </s> included."""
    if self._fast is not None:
      ids = self._fast.encode(caption).ids  # The post-processor of a T5 tokenizer.json appends </s>.
      return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]
    return self._sp.encode(caption) + [self.eos_id]

  def __call__(self, captions, max_length: int):
    ids = np.full((len(captions), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(captions), max_length), bool)
    for i, caption in enumerate(captions):
      pieces = self.pieces(caption)
      if len(pieces) > max_length:
        pieces = pieces[: max_length - 1] + [self.eos_id]
      ids[i, : len(pieces)] = pieces
      mask[i, : len(pieces)] = True
    return ids, mask


# ------------------------------------------------------------------ weights


def tensor_map(c: t5_lib.T5Config) -> dict:
  """Hugging Face tensor name -> (param path in T5Encoder, layer index or None, HF shape, to_param).

  to_param turns the HF array (torch Linear: [out, in]) into the param's layout."""
  d, h, k, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
  entries = {
      "shared.weight": (("embed",), None, (c.vocab_size, d), lambda a: a),
      "encoder.final_layer_norm.weight": (("final_norm", "weight"), None, (d,), lambda a: a),
  }
  bias_name = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
  if not c.per_layer_bias:
    entries[bias_name.format(0)] = (("relative_bias",), None, (c.num_buckets, h), lambda a: a)
  ff = ("wi_0", "wi_1") if c.gated else ("wi",)
  for i in range(c.num_layers):
    prefix = f"encoder.block.{i}.layer"
    for name in ("q", "k", "v"):
      entries[f"{prefix}.0.SelfAttention.{name}.weight"] = (
          ("blocks", name), i, (h * k, d), lambda a: a.T.reshape(d, h, k))
    entries[f"{prefix}.0.SelfAttention.o.weight"] = (("blocks", "o"), i, (d, h * k), lambda a: a.T.reshape(h, k, d))
    if c.per_layer_bias:
      entries[bias_name.format(i)] = (("blocks", "relative_bias"), i, (c.num_buckets, h), lambda a: a)
    entries[f"{prefix}.0.layer_norm.weight"] = (("blocks", "attn_norm", "weight"), i, (d,), lambda a: a)
    for name in ff:
      entries[f"{prefix}.1.DenseReluDense.{name}.weight"] = (("blocks", name), i, (f, d), lambda a: a.T)
    entries[f"{prefix}.1.DenseReluDense.wo.weight"] = (("blocks", "wo"), i, (d, f), lambda a: a.T)
    entries[f"{prefix}.1.layer_norm.weight"] = (("blocks", "ff_norm", "weight"), i, (d,), lambda a: a)
  return entries


def _checkpoint_tensors(files) -> dict:
  """name -> (file, shape) over every file."""
  where = {}
  for path in files:
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        where[name] = (path, tuple(f.get_slice(name).get_shape()))
  return where


def check_tensors(c: t5_lib.T5Config, available: dict, directory="") -> dict:
  """HF name -> (file, name in that file) for every tensor the encoder needs, or a UsageError
  with the lists of missing, unexpected and wrongly shaped tensors. available: name -> (file, shape)."""
  expected = tensor_map(c)
  stored = {n: n for n in available}
  available = dict(available)
  if "shared.weight" not in available and "encoder.embed_tokens.weight" in available:
    available["shared.weight"] = available.pop("encoder.embed_tokens.weight")
    stored["shared.weight"] = "encoder.embed_tokens.weight"
  skipped = [n for n in available if n.startswith(SKIPPED_PREFIXES) or n == "encoder.embed_tokens.weight"]
  missing = sorted(n for n in expected if n not in available)
  unexpected = sorted(n for n in available if n not in expected and n not in skipped)
  wrong = sorted(f"{n}: {list(available[n][1])}, expected {list(expected[n][2])}"
                 for n in expected if n in available and tuple(available[n][1]) != tuple(expected[n][2]))
  if missing or unexpected or wrong:
    def listed(names):
      more = f" ... and {len(names) - LISTED} more" if len(names) > LISTED else ""
      return ", ".join(names[:LISTED]) + more if names else "none"
    raise UsageError(
        f"the weights in {directory} do not match its config.json ({c.model_type}, {c.num_layers} layers, "
        f"d_model {c.d_model}): missing {len(missing)}: {listed(missing)}; unexpected {len(unexpected)}: "
        f"{listed(unexpected)}; wrong shape {len(wrong)}: {listed(wrong)}"
    )
  if skipped:
    log.info("%s: skipping %d tensors the encoder does not use (decoder, lm_head)", directory, len(skipped))
  return {n: (available[n][0], stored[n]) for n in expected}


def read_params(c: t5_lib.T5Config, files, directory="") -> dict:
  """The encoder's params as a nested dict of host numpy arrays (layer tensors stacked), float32."""
  where = check_tensors(c, _checkpoint_tensors(files), directory)
  by_file = {}
  for name, (path, stored) in where.items():
    by_file.setdefault(path, []).append((name, stored))
  entries = tensor_map(c)
  flat, stacks = {}, {}
  for path, names in by_file.items():
    with safe_open(str(path), framework="numpy") as f:
      for name, stored in names:
        param, layer, _, to_param = entries[name]
        value = to_param(np.asarray(f.get_tensor(stored)).astype(np.float32))
        if layer is None:
          flat[param] = value
        else:
          stacks.setdefault(param, [None] * c.num_layers)[layer] = value
  flat.update({param: np.stack(values) for param, values in stacks.items()})
  params = {}
  for path, value in flat.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return params


def fingerprint(directory) -> str:
  """16 hex digits that name an encoder: config.json, the tokenizer file, and for every weight
  tensor its name, dtype, shape and its first and last rows. Reading rows rather than whole files
  keeps this to milliseconds for a 10 GB checkpoint, yet two different trainings of one
  architecture differ in every tensor, so they never share a fingerprint."""
  directory = epath.Path(directory)
  digest = hashlib.sha256()
  digest.update((directory / "config.json").read_bytes())
  digest.update(tokenizer_file(directory).read_bytes())
  tensors = _checkpoint_tensors(weight_files(directory))
  labels = {}  # Label -> stored name; the embedding table has two names (tied), one label.
  for name in tensors:
    if name == "encoder.embed_tokens.weight":
      labels.setdefault("shared.weight", name)
    elif not name.startswith(SKIPPED_PREFIXES):
      labels[name] = name
  for label, name in sorted(labels.items()):
    path, shape = tensors[name]
    with safe_open(str(path), framework="numpy") as f:
      piece = f.get_slice(name)
      digest.update(f"{label}:{piece.get_dtype()}:{list(shape)}".encode())
      if shape and shape[0]:
        digest.update(np.ascontiguousarray(piece[:1]).tobytes())
        digest.update(np.ascontiguousarray(piece[shape[0] - 1 :]).tobytes())
  return digest.hexdigest()[:16]


# ------------------------------------------------------------------ the frozen encoder on a mesh


class TextEncoder:
  """A frozen T5/UMT5 on a mesh: captions -> (embeddings float32 [N, S, E], mask bool [N, S]).

  Params are sharded by their logical names; each call's captions are padded to a multiple of
  the data-parallel size and split over the batch axes. `embed` is for captions every process
  holds alike (prompts); `embed_local` takes this process's own captions (every process calls
  it together, with the same count)."""

  def __init__(self, directory, mesh, config, dtype="float32", max_length=None):
    self.directory = check_directory(directory)
    self.t5_config = t5_lib.read_config(self.directory)
    self.tokenizer = Tokenizer(self.directory)
    self.max_length = int(max_length or config.text.max_length)
    self.dtype = dtype
    self.mesh, self.config = mesh, config
    self.fingerprint = fingerprint(self.directory)
    self.kind = self.t5_config.model_type
    c = self.t5_config
    build = lambda: t5_lib.T5Encoder(c, dtype=dtype, rngs=nnx.Rngs(0))
    self.graphdef, abstract, shardings = mesh_lib.abstract_model(build, config, mesh)
    host = read_params(c, weight_files(self.directory), self.directory)
    target = layers.compute_dtype(dtype)
    self.params = jax.tree.map(
        lambda value, spec, sharding: jax.make_array_from_callback(
            spec.shape, sharding, lambda index, v=value: v[index].astype(target)),
        host, abstract, shardings)
    self.param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(host))
    graphdef = self.graphdef

    self._out_sharding = mesh_lib.batch_sharding(mesh, config, 3)

    @functools.partial(jax.jit, out_shardings=self._out_sharding)
    def encode(params, ids, mask):
      return nnx.merge(graphdef, params)(ids, mask)

    self._encode = encode
    log.info("text encoder %s (%s, %d layers, d_model %d, %.1f M params, %s): fingerprint %s", self.directory,
             self.kind, c.num_layers, c.d_model, self.param_count / 1e6, dtype, self.fingerprint)

  @property
  def embed_dim(self) -> int:
    return self.t5_config.d_model

  def describe(self) -> dict:
    """What names this encoder in a cache manifest."""
    return {"kind": self.kind, "path": str(self.directory), "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim, "max_length": self.max_length, "dtype": self.dtype}

  def embed(self, captions):
    """Captions (the same list in every process) -> float32 [N, S, E], bool [N, S] on every host."""
    ids, mask = self.tokenizer(list(captions), self.max_length)
    n = len(ids)
    multiple = mesh_lib.data_parallel_size(self.mesh, self.config) * jax.process_count()
    pad = -n % multiple
    if pad:
      ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
      mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
    share = len(ids) // jax.process_count()
    start = jax.process_index() * share
    out = self._run(ids[start : start + share], mask[start : start + share])
    out = mesh_lib.to_host(out)
    return np.asarray(out[:n], np.float32), mask[:n]

  def embed_local(self, captions):
    """This process's captions -> this process's float32 [N, S, E] and bool [N, S]. Every
    process calls it together, with the same number of captions."""
    ids, mask = self.tokenizer(list(captions), self.max_length)
    n = len(ids)
    pad = -n % (mesh_lib.data_parallel_size(self.mesh, self.config) // jax.process_count() or 1)
    if pad:
      ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
      mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
    out = self._run(ids, mask)
    local = multihost_utils.global_array_to_host_local_array(out, self.mesh, self._out_sharding.spec)
    return np.asarray(local, np.float32)[:n], mask[:n]

  def _run(self, ids, mask):
    with mesh_lib.activate(self.mesh, self.config):
      batch = mesh_lib.make_global_batch({"ids": ids, "mask": mask}, self.mesh, self.config)
      return self._encode(self.params, batch["ids"], batch["mask"])


# One encoder per (directory, dtype, length, mesh): sampling hooks and engines made again reuse it.
_LOADED = {}


def load_text_encoder(config, mesh) -> TextEncoder:
  """The encoder config.text.t5_path names, in config.text.t5_dtype, on `mesh` (cached per process)."""
  t = config.text
  key = (str(t.t5_path), t.t5_dtype, int(t.max_length), tuple(d.id for d in mesh.devices.flat), mesh.axis_names,
         json.dumps(config.mesh.rules.to_dict(), sort_keys=True))
  if key not in _LOADED:
    _LOADED[key] = TextEncoder(t.t5_path, mesh, config, dtype=t.t5_dtype, max_length=t.max_length)
  return _LOADED[key]
