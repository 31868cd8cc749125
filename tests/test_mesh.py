"""Meshes of several shapes on 8 fake CPU devices, and the sharding helpers."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError


def _config(ici, dcn=None):
  c = config_lib.base_config()
  with c.unlocked():
    c.mesh.ici.update(ici)
    if dcn:
      c.mesh.dcn.update(dcn)
  return c


@pytest.mark.parametrize(
    "ici, expected",
    [
        (dict(data=-1), dict(data=8, fsdp=1, sequence=1, tensor=1)),
        (dict(data=1, fsdp=-1, tensor=2), dict(data=1, fsdp=4, sequence=1, tensor=2)),
        (dict(data=2, fsdp=2, sequence=1, tensor=2), dict(data=2, fsdp=2, sequence=1, tensor=2)),
        (dict(data=-1, fsdp=2, sequence=2, tensor=2), dict(data=1, fsdp=2, sequence=2, tensor=2)),
    ],
)
def test_mesh_shapes(ici, expected):
  mesh = mesh_lib.make_mesh(_config(ici))
  assert dict(mesh.shape) == expected
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_every_axis_larger_than_one_with_two_slices():
  """dcn data=2 (two slices) x ici fsdp=2, sequence=2... uses every axis > 1."""
  c = _config(dict(data=1, fsdp=2, sequence=1, tensor=2), dcn=dict(data=2))
  mesh = mesh_lib.make_mesh(c)
  assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=1, tensor=2)
  # Each slice (consecutive device group) holds one index of the DCN data axis.
  slice0 = {d.id for d in mesh.devices[0].flat}
  assert slice0 == {0, 1, 2, 3}
  c = _config(dict(data=-1, fsdp=2, sequence=2, tensor=2))
  with c.unlocked():
    c.mesh.ici.data = 1
    c.mesh.ici.tensor = 1
    c.mesh.dcn.data = 2
  assert dict(mesh_lib.make_mesh(c).shape) == dict(data=2, fsdp=2, sequence=2, tensor=1)


def test_mesh_that_does_not_fit_says_what_would():
  with pytest.raises(UsageError, match="needs 12 devices.*there are 8.*for example"):
    mesh_lib.make_mesh(_config(dict(data=3, fsdp=2, sequence=1, tensor=2)))
  with pytest.raises(UsageError, match="cannot fill 8"):
    mesh_lib.make_mesh(_config(dict(data=-1, fsdp=3)))
  with pytest.raises(UsageError, match="at most one -1"):
    mesh_lib.make_mesh(_config(dict(data=-1, fsdp=-1)))


def test_rules_with_unknown_mesh_axis_fail():
  c = config_lib.base_config()
  with c.unlocked():
    c.mesh.rules.embed = ("fsdpp",)
  with pytest.raises(UsageError, match="mesh.rules.embed.*fsdpp"):
    mesh_lib.logical_rules(c)


class _Annotated(nnx.Module):

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
    self.heads = nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(rngs.params(), (8, 4, 2)))
    self.plain = nnx.Param(jax.numpy.ones((3,)))


def test_annotated_module_gets_the_specs_the_rules_say():
  c = _config(dict(data=2, fsdp=2, sequence=1, tensor=2))
  mesh = mesh_lib.make_mesh(c)
  with mesh_lib.activate(mesh, c):
    model = _Annotated(nnx.Rngs(0))
  _, state = nnx.split(model)
  shardings = mesh_lib.param_shardings(state, mesh, c)
  assert shardings["up"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["heads"].spec == P("fsdp", "tensor", None)
  assert shardings["plain"].spec == P()
  # Params created under `activate` already live with those shardings.
  assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert model.up.kernel[...].sharding.shard_shape((8, 16)) == (4, 8)


def test_param_shardings_are_the_same_with_the_rules_in_scope():
  """The stages ask for shardings inside `activate(...)`: the rules in scope must not
  be applied twice (which replicated every param)."""
  c = _config(dict(data=2, fsdp=2, sequence=1, tensor=2))
  mesh = mesh_lib.make_mesh(c)
  with mesh_lib.activate(mesh, c):
    _, state = nnx.split(nnx.eval_shape(lambda: _Annotated(nnx.Rngs(0))))
    shardings = mesh_lib.param_shardings(state, mesh, c)
  assert shardings["up"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["heads"].spec == P("fsdp", "tensor", None)


def test_batch_lands_sharded_over_data_and_fsdp():
  c = _config(dict(data=2, fsdp=2, sequence=1, tensor=2))
  mesh = mesh_lib.make_mesh(c)
  local = {"video": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
  batch = mesh_lib.make_global_batch(local, mesh, c)
  assert batch["video"].sharding.spec == P(("data", "fsdp"), None)
  assert batch["video"].sharding.shard_shape((8, 3)) == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["video"]), local["video"])
  assert mesh_lib.data_parallel_size(mesh, c) == 4


def test_constrain_resolves_logical_names_inside_jit():
  c = _config(dict(data=2, fsdp=2, sequence=2, tensor=1))
  mesh = mesh_lib.make_mesh(c)
  with mesh_lib.activate(mesh, c):
    f = jax.jit(lambda x: mesh_lib.constrain(x * 2, "batch", "length", "embed"))
    y = f(np.ones((4, 4, 8), np.float32))
  # embed -> fsdp is already used by batch, so flax leaves the feature axis unsharded.
  assert y.sharding.spec == P(("data", "fsdp"), "sequence")


def test_init_distributed_is_a_noop_for_one_process(monkeypatch):
  for var in ("VIDSIM_COORDINATOR", "VIDSIM_NUM_PROCESSES", "VIDSIM_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  mesh_lib.init_distributed(config_lib.base_config())
  assert jax.process_count() == 1


def test_init_distributed_needs_a_coordinator_for_several(monkeypatch):
  monkeypatch.setenv("VIDSIM_NUM_PROCESSES", "2")
  with pytest.raises(UsageError, match="coordinator"):
    mesh_lib.init_distributed(config_lib.base_config())


_EVERY_AXIS_SCRIPT = """
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from vidsim import config as config_lib, mesh as mesh_lib
c = config_lib.base_config()
with c.unlocked():
  c.mesh.ici.update(dict(data=1, fsdp=2, sequence=2, tensor=2))
  c.mesh.dcn.update(dict(data=2))
mesh = mesh_lib.make_mesh(c)
assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=2, tensor=2), mesh.shape
with mesh_lib.activate(mesh, c):
  layer = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                     rngs=nnx.Rngs(0))
assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")
batch = mesh_lib.make_global_batch({"x": np.zeros((8, 4, 3), np.float32)}, mesh, c)
assert batch["x"].sharding.shard_shape((8, 4, 3)) == (2, 4, 3)
print("ok")
"""


def test_mesh_with_every_axis_larger_than_one_on_16_devices():
  """2 slices (DCN data=2) x (fsdp=2, sequence=2, tensor=2): needs 16 devices, so a subprocess."""
  import os
  import subprocess
  import sys

  flags = f"{os.environ.get('VIDSIM_TEST_XLA_FLAGS', '')} --xla_force_host_platform_device_count=16"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _EVERY_AXIS_SCRIPT], env=env, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
