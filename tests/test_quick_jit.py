"""quick_jit: XLA:CPU's quick-compile options for run-once programs, same values."""

import jax
import numpy as np

from vidsim import quick_jit as quick_jit_lib
from vidsim.quick_jit import quick_jit


def test_the_options_reach_jax_jit_on_cpu_merged_with_the_callers(monkeypatch):
  seen = {}

  def fake_jit(fn, **kwargs):
    seen.update(kwargs)
    return fn

  monkeypatch.setattr(quick_jit_lib.jax, "jit", fake_jit)
  quick_jit(abs, donate_argnums=0, compiler_options={"xla_cpu_enable_fast_math": False})
  assert seen["donate_argnums"] == 0
  assert seen["compiler_options"] == {**quick_jit_lib.CPU_QUICK_COMPILE, "xla_cpu_enable_fast_math": False}


def test_a_train_state_initializer_compiles_with_them_to_the_same_values(tiny_config):
  """XLA accepts the option names (an unknown DebugOptions field fails the compile) and
  the state matches jax.jit's to float rounding."""
  from vidsim import mesh as mesh_lib
  from vidsim.train.stage import assemble

  stage = assemble(tiny_config, mesh_lib.job_mesh(tiny_config), "dit")
  quick = quick_jit(stage.init_state, out_shardings=stage.state_shardings)()
  default = jax.jit(stage.init_state, out_shardings=stage.state_shardings)()
  assert jax.tree.structure(quick) == jax.tree.structure(default)
  for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(default)):
    assert a.sharding == b.sharding
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
