"""`quick_jit`: jax.jit for a program whose compile takes far longer than its runs.

A train state's initializer runs once; the VAE's validation reconstruction runs on one
batch every few hundred steps. On XLA:CPU their cost is the compile, most of it LLVM
optimising code that barely runs. With LLVM at -O0 and the elemental emitters in place
of the MLIR fusion emitters, the demo's VAE and DiT state initializers compile in
1.0-1.4 s instead of 6-7 s (docs/benchmarks.md, "Compile time"). The code those options emit runs
slower (a 50-step sample of 8 clips of 33 frames: 26-31 s -> 61-70 s), so whatever runs
on real amounts of data (train steps, the latent cache's encoder, evaluation over a
split, the sampler) keeps XLA's defaults. On TPU and GPU this is plain jax.jit: the
options are XLA:CPU's.
"""

import jax

# DebugOptions fields, set for this compile only (the process's XLA_FLAGS stay as they are).
CPU_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def quick_jit(fn, **jit_kwargs):
  """jax.jit(fn, **jit_kwargs), with XLA:CPU's quick-compile options on the CPU backend."""
  if jax.default_backend() == "cpu":
    jit_kwargs["compiler_options"] = {**CPU_QUICK_COMPILE, **jit_kwargs.get("compiler_options", {})}
  return jax.jit(fn, **jit_kwargs)
