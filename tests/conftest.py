"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root():
  return REPO


@pytest.fixture
def tiny_config():
  """The CI experiment config, unlocked-safe copy (tests override with `with c.unlocked()`)."""
  from vidsim import config as config_lib

  return config_lib.load_config(str(REPO / "experiments" / "digits_tiny.py"))
