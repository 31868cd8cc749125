"""The models a config describes, built whole or only as shapes and shardings.

`build_*` allocate the weights (seeded by config.seed); `abstract_*` give
(graphdef, abstract params, param shardings) on a mesh without allocating anything:
what restoring a checkpoint, sharding a train state and ahead-of-time compiles need.
"""

import functools

from flax import nnx

from vidsim import mesh as mesh_lib
from vidsim.models import dit as dit_lib
from vidsim.models import vae as vae_lib


def build_dit(config) -> dit_lib.DiT:
  return dit_lib.DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(config.seed))


def build_vae(config) -> vae_lib.VideoVAE:
  return vae_lib.VideoVAE(config.vae, rngs=nnx.Rngs(config.seed))


def abstract_dit(config, mesh):
  """(graphdef, abstract params, param shardings) of the DiT."""
  return mesh_lib.abstract_model(functools.partial(build_dit, config), config, mesh)


def abstract_vae(config, mesh):
  """(graphdef, abstract params, param shardings) of the VAE."""
  return mesh_lib.abstract_model(functools.partial(build_vae, config), config, mesh)
