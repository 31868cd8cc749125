"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

# The suite compiles hundreds of small programs and runs each for milliseconds, so
# compile time is most of its time, and these flags cut it. LLVM at -O0
# (tests/test_segment_blocks.py: 76 s -> 45 s; the suite on 2 cores: 16.3 -> 10.4 min).
# XLA:CPU's older elemental emitters in place of its MLIR fusion emitters compile faster
# still (the same file 62 s -> 35 s; the suite on 2 cores of a Zen 4: 612 s -> 414 s)
# and run small steps slower (the demo's DiT step 0.39 -> 0.47 s), so vidsim itself keeps
# XLA's default. Tests check values, not speed; the benchmarks run at XLA's defaults.
# Tests that start processes with their own device count put VIDSIM_TEST_XLA_FLAGS in
# front of it.
os.environ.setdefault("VIDSIM_TEST_XLA_FLAGS",
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), os.environ["VIDSIM_TEST_XLA_FLAGS"], "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
  """Files with the most `slow` or `multiprocess` tests first, each file's tests in place.

  `make test` runs each file in one worker (`--dist loadfile`) and hands the files out in
  this order (`--no-loadscope-reorder`; xdist's own order puts the files with the most
  tests first, which are quick parametrised ones): the files that train and start
  processes begin first, and the quick ones fill in around them, so the workers finish
  together instead of one running a long file alone at the end."""
  marked = collections.Counter(
      item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("multiprocess"))
  items.sort(key=lambda item: -marked[item.path])  # Stable: the other files keep their order.


@pytest.fixture
def repo_root():
  return REPO


@pytest.fixture
def tiny_config():
  """The CI experiment config, unlocked-safe copy (tests override with `with c.unlocked()`)."""
  from vidsim import config as config_lib

  return config_lib.load_config(str(REPO / "experiments" / "digits_tiny.py"))


@pytest.fixture
def shared_compile_cache(tmp_path):
  """Config arguments that give every one-process vidsim run a test starts one compile
  cache, whatever its workdir, holding every computation: a run on a layout an earlier
  run of the test compiled loads the executables instead (as a restarted job does from
  its workdir's cache). The runs still trace and check everything they did. Jobs of
  several CPU processes keep the cache off (vidsim/runtime.py says why)."""
  return [f"--config.compile_cache_dir={tmp_path}/compile_cache", "--config.compile_cache_min_compile_s=0"]
