"""The vidsim command re-executes itself once with huge-page malloc (vidsim/malloc.py)."""

import os
import subprocess
import sys

import pytest

from vidsim import malloc

CHECK = "from vidsim import malloc; malloc.reexec_with_hugepages(); print(malloc.hugepages_active())"


def _run(env):
  clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VIDSIM_HUGEPAGES")}
  return subprocess.run([sys.executable, "-c", CHECK], env={**clean, **env}, capture_output=True, text=True, check=True)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not malloc.thp_enabled(), reason="needs Linux with THP")
def test_reexec_sets_the_tunable_once_and_keeps_the_users():
  assert _run({}).stdout.split() == ["True"]  # One line: the re-executed process, not two.
  kept = subprocess.run(
      [sys.executable, "-c", CHECK + "; import os; print(os.environ['GLIBC_TUNABLES'])"],
      env={**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}, capture_output=True, text=True,
      check=True,
  )
  assert kept.stdout.split() == ["True", "glibc.malloc.trim_threshold=4096:glibc.malloc.hugetlb=1"]


def test_switched_off_by_the_environment():
  assert _run({"VIDSIM_HUGEPAGES": "0"}).stdout.split() == ["False"]
