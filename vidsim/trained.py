"""Trained models from a workdir, for inference: the VAE (encode, decode) and the DiT.

Both restore their EMA weights through `checkpoint.restore_weights`, the same path
fine-tuning (`init_from`) takes, onto the current mesh.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vidsim.models import build
from vidsim.train.checkpoint import restore_weights


def vae_checkpoints(workdir) -> epath.Path:
  return epath.Path(workdir) / "vae" / "checkpoints"


def dit_checkpoints(workdir) -> epath.Path:
  return epath.Path(workdir) / "dit" / "checkpoints"


class TrainedVAE:
  """The EMA weights and latent statistics of the latest VAE checkpoint, as host arrays,
  so each process can encode and decode its own shard without collectives."""

  def __init__(self, config, workdir, mesh):
    self.graphdef, abstract_params, _ = build.abstract_vae(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    stat = jax.ShapeDtypeStruct((config.vae.latent_channels,), jnp.float32, sharding=replicated)
    restored, self.step, _ = restore_weights(
        vae_checkpoints(workdir), "VAE", f"run `vidsim train-vae --config ... --workdir {workdir}` first",
        abstract_params, replicated, extra={"latent_shift": stat, "latent_scale": stat})
    host = lambda x: np.asarray(x.addressable_data(0))
    self.params = jax.tree.map(host, restored["ema"])
    self.shift, self.scale = host(restored["latent_shift"]), host(restored["latent_scale"])
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((self.params, self.shift, self.scale)):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    digest.update(repr(sorted(config.vae.to_dict().items())).encode())
    self.fingerprint = digest.hexdigest()[:16]  # Names the VAE a latent cache was made with.

  def model(self):
    return nnx.merge(self.graphdef, self.params)


class TrainedDiT:
  """The EMA weights of the latest DiT checkpoint, sharded as in training."""

  def __init__(self, config, workdir, mesh):
    self.graphdef, abstract_params, shardings = build.abstract_dit(config, mesh)
    restored, self.step, _ = restore_weights(
        dit_checkpoints(workdir), "DiT", f"run `vidsim train --config ... --workdir {workdir}` first",
        abstract_params, shardings)
    self.params = restored["ema"]
