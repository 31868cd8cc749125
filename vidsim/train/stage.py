"""A training stage assembled on a mesh: model, optimizer, train state and step.

`assemble(config, mesh, "dit" | "vae")` is what the trainers, `vidsim bench` and
`vidsim compile` share: the abstract model with its parameter shardings, the
optimizer of the stage's config section, the train state's builder and shardings, and
the pure train step. Nothing is allocated until `init_state` runs.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec

from vidsim.errors import UsageError
from vidsim.models import build
from vidsim.train import dit_step, optim, vae_step

# name -> (abstract model, step module, the config section with the optimizer settings)
STAGES = {
    "dit": (build.abstract_dit, dit_step, "train"),
    "vae": (build.abstract_vae, vae_step, "vae_train"),
}


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  graphdef: Any
  abstract_params: Any  # ShapeDtypeStructs of the params.
  param_shardings: Any
  optimizer: Any
  init_state: Callable[[], Any]  # Builds the train state (jit it with out_shardings=state_shardings).
  state_shardings: Any  # NamedShardings matching the train state.
  train_step: Callable  # Pure (state, global batch) -> (state, metrics).


def assemble(config, mesh, name: str) -> Stage:
  if name not in STAGES:
    raise UsageError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
  abstract, step_module, section = STAGES[name]
  graphdef, abstract_params, param_shardings = abstract(config, mesh)
  optimizer = optim.make_optimizer(config[section])
  init_state = functools.partial(step_module.init_state, config, optimizer)
  shardings = state_shardings(jax.eval_shape(init_state), abstract_params, param_shardings, mesh)
  return Stage(name, graphdef, abstract_params, param_shardings, optimizer, init_state, shardings,
               step_module.make_train_step(config, graphdef, optimizer))


def state_shardings(abstract_state, params, param_shardings, mesh):
  """Shardings for a whole train state: every subtree shaped like the params (params,
  EMA, optimizer moments) gets the params' shardings; everything else is replicated."""
  params_def = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def assign(subtree):
    if jax.tree.structure(subtree) == params_def:
      return param_shardings
    if isinstance(subtree, dict):
      return {k: assign(v) for k, v in subtree.items()}
    if isinstance(subtree, (list, tuple)):
      values = [assign(v) for v in subtree]
      return type(subtree)(*values) if hasattr(subtree, "_fields") else type(subtree)(values)
    return jax.tree.map(lambda _: replicated, subtree)

  return assign(abstract_state)
