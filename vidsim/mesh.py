"""Device mesh, logical axis rules, shardings, global batches and jax.distributed.

One mesh per job, built from `config.mesh`: ICI axes (data, fsdp, sequence, tensor)
inside a slice and the same axes over DCN across slices. Parameters carry logical
axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); `config.mesh.rules`
maps those names to mesh axes, and every helper here reads that one table.
"""

import contextlib
import math
import os

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vidsim.config import MESH_AXES
from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger("mesh")

# ------------------------------------------------------------------ distributed


def init_distributed(config) -> None:
  """Starts jax.distributed when the job has several processes; a no-op for one.

  Sources, in order: config.distributed, then env VIDSIM_COORDINATOR /
  VIDSIM_NUM_PROCESSES / VIDSIM_PROCESS_ID, then jax's own auto-detection (TPU pods,
  SLURM). Must run before anything touches a jax backend.
  """
  dist = config.distributed
  address = dist.coordinator_address or os.environ.get("VIDSIM_COORDINATOR", "")
  num = dist.num_processes or int(os.environ.get("VIDSIM_NUM_PROCESSES", "0"))
  pid = dist.process_id if dist.process_id >= 0 else int(os.environ.get("VIDSIM_PROCESS_ID", "-1"))
  on_tpu = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"))
  if jax.distributed.is_initialized():
    return
  if not address and not on_tpu:
    if num > 1:
      raise UsageError(
          f"distributed.num_processes={num} but no coordinator address: set "
          "--config.distributed.coordinator_address=HOST:PORT or VIDSIM_COORDINATOR"
      )
    return  # One process: nothing to initialise.
  if address and (num < 1 or pid < 0):
    raise UsageError(
        f"coordinator {address} given, but num_processes={num} and process_id={pid}: "
        "set both (config.distributed or VIDSIM_NUM_PROCESSES / VIDSIM_PROCESS_ID)"
    )
  if jax.config.jax_platforms in (None, "", "cpu") and not on_tpu:
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  kwargs = dict(initialization_timeout=dist.initialization_timeout_s,
                heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
                shutdown_timeout_seconds=dist.shutdown_timeout_s)
  if address:
    kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# ------------------------------------------------------------------ mesh


def mesh_shape(config, num_devices: int, num_slices: int = 1):
  """Resolves -1 in config.mesh.ici / dcn against the device count: (ici, dcn) tuples."""
  dcn = _resolve(config.mesh.dcn, num_slices, "dcn", "slices")
  per_slice, remainder = divmod(num_devices, num_slices)
  if remainder:
    raise UsageError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = _resolve(config.mesh.ici, per_slice, "ici", "devices per slice")
  return ici, dcn


def _resolve(axes, total: int, name: str, what: str):
  sizes = [int(axes[a]) for a in MESH_AXES]
  unknown = [a for a in axes.keys() if a not in MESH_AXES]
  if unknown:
    raise UsageError(f"mesh.{name} has unknown axes {unknown}; valid: {list(MESH_AXES)}")
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f"mesh.{name} = {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if total % fixed:
      raise UsageError(
          f"mesh.{name} = {dict(zip(MESH_AXES, sizes))} cannot fill {total} {what}: "
          f"the fixed axes multiply to {fixed}, which does not divide {total}"
      )
    sizes[fills[0]] = total // fixed
  elif fixed != total:
    raise UsageError(
        f"mesh.{name} = {dict(zip(MESH_AXES, sizes))} needs {fixed} {what} but there are {total}; "
        f"{_suggest(sizes, total)}"
    )
  return tuple(sizes)


def _suggest(sizes, total):
  """A layout that would fit: the same axes with the data axis adjusted, or data=-1."""
  rest = math.prod(sizes[1:])
  if total % rest == 0:
    fit = dict(zip(MESH_AXES, [total // rest] + list(sizes[1:])))
    return f"for example {fit}, or set one axis to -1"
  return f"for example data={total} with the other axes 1, or set one axis to -1"


def _num_slices(devices) -> int:
  slices = {getattr(d, "slice_index", 0) for d in devices}
  return len(slices)


def make_mesh(config, devices=None) -> Mesh:
  """The job's mesh. Multi-slice when config.mesh.dcn has an axis > 1.

  On TPU pods, slices come from the devices' slice_index and the mesh is built with
  `create_hybrid_device_mesh` (DCN axes outermost). Devices without slices (CPU tests)
  are split into equal consecutive groups, one per requested slice, so the same
  config runs in CI with the same axis layout.
  """
  devices = list(jax.devices() if devices is None else devices)
  requested_slices = math.prod(int(v) for v in config.mesh.dcn.values() if int(v) > 0)
  physical_slices = _num_slices(devices)
  num_slices = physical_slices if physical_slices > 1 else max(requested_slices, 1)
  ici, dcn = mesh_shape(config, len(devices), num_slices)
  if math.prod(dcn) > 1 and physical_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif math.prod(dcn) > 1:
    grid = _grouped_hybrid_grid(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError):
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _grouped_hybrid_grid(ici, dcn, devices):
  """Like create_hybrid_device_mesh, with consecutive device groups standing in for slices."""
  num_slices = math.prod(dcn)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  per_slice = len(ordered) // num_slices
  slices = [np.asarray(ordered[i * per_slice : (i + 1) * per_slice]).reshape(ici) for i in range(num_slices)]
  # Lay slices out on the dcn grid, then merge each dcn axis with its ici axis (dcn outer).
  stacked = np.stack(slices).reshape(tuple(dcn) + tuple(ici))
  n = len(ici)
  order = [ax for i in range(n) for ax in (i, n + i)]
  return stacked.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def job_mesh(config) -> Mesh:
  """Start of every stage command: jax.distributed (if several processes), then the mesh."""
  init_distributed(config)
  mesh = make_mesh(config)
  log.info("mesh: %s", describe(mesh))
  return mesh


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())


# ------------------------------------------------------------------ logical rules


def logical_rules(config):
  """config.mesh.rules as the ((logical, mesh_axes), ...) table flax expects."""
  rules = []
  for name, axes in config.mesh.rules.items():
    axes = tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise UsageError(f"mesh.rules.{name} names unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
    rules.append((name, axes if len(axes) > 1 else (axes[0] if axes else None)))
  return tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, config):
  """The mesh and rules in scope: models built here get sharded params, and
  `constrain` calls inside jitted code resolve their logical names."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(config)):
    yield


def logical_to_mesh_spec(logical_spec, rules) -> PartitionSpec:
  """One PartitionSpec of logical names -> a PartitionSpec of mesh axes."""
  return nn.logical_to_mesh_axes(tuple(logical_spec), rules)


def param_shardings(state, mesh: Mesh, config):
  """NamedShardings for a pytree of NNX params annotated with logical axis names.

  Unannotated params are replicated. Scanned params must carry their stacked axis
  in their names (e.g. "layers") or their spec would be one dimension short.
  """
  rules = logical_rules(config)
  # Read the logical names with no rules in scope: under `activate(...)` (as the stages
  # call this) nnx.get_partition_spec already maps them to mesh axes, and mapping
  # those again through the rules would replicate every param.
  with nn.logical_axis_rules(()):
    logical = nnx.get_partition_spec(state)

  def to_sharding(leaf):
    spec = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if spec is None:
      spec = PartitionSpec()
    return NamedSharding(mesh, logical_to_mesh_spec(spec, rules))

  return jax.tree.map(
      to_sharding, logical, is_leaf=lambda x: isinstance(x, (PartitionSpec, nnx.Variable)) or x is None
  )


def logical_sharding(mesh: Mesh, config, *logical_axes) -> NamedSharding:
  """A NamedSharding for an array whose dimensions have these logical names (None = replicated)."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, logical_rules(config)))


def batch_sharding(mesh: Mesh, config, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over the rule for 'batch' (data, fsdp); the rest replicated."""
  return logical_sharding(mesh, config, "batch", *([None] * (ndim - 1)))


def constrain(x, *logical_axes):
  """Constrains an activation by logical names, inside jit under `activate(...)`."""
  return nn.with_logical_constraint(x, logical_axes)


# ------------------------------------------------------------------ models on the mesh


def abstract_model(build, config, mesh: Mesh):
  """(graphdef, abstract params, param shardings) of `build()` without allocating weights."""
  with activate(mesh, config):
    abstract = nnx.eval_shape(build)
  graphdef, params, others, shardings = split_model(abstract, mesh, config)
  if jax.tree.leaves(others):
    raise TypeError(f"{type(abstract).__name__} must hold only nnx.Param variables, found {others}")
  return graphdef, params, shardings


def split_model(model, mesh: Mesh, config):
  """(graphdef, params, others, param_shardings) of an NNX model, as plain dicts.

  Params train; `others` (non-Param variables) ride along unchanged. Plain dicts keep
  the train state a simple pytree for jit, optax and Orbax.
  """
  graphdef, params, others = nnx.split(model, nnx.Param, ...)
  shardings = param_shardings(params, mesh, config)
  return graphdef, nnx.to_pure_dict(params), others, nnx.to_pure_dict(shardings)


# ------------------------------------------------------------------ batches


def data_parallel_size(mesh: Mesh, config) -> int:
  """How many ways the batch dimension is split: global batches must be a multiple."""
  axes = dict(logical_rules(config)).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def make_global_batch(local_batch, mesh: Mesh, config):
  """Host-local numpy arrays (this process's rows) -> global jax.Arrays over (data, fsdp).

  Each process passes its own slice of the global batch; the leading dimension of
  the global array is the sum over processes.
  """

  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, config, x.ndim)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)


def to_host(tree):
  """numpy copies of jax.Arrays that may span other processes' devices.

  Replicated arrays are read from a local copy; sharded ones are all-gathered (every
  process must call this for them, as for any collective).
  """
  from jax.experimental import multihost_utils

  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(fetch, tree)
