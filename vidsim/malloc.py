"""Start the `vidsim` command with glibc's malloc backing large blocks by huge pages.

Why: XLA:CPU allocates each step's temporary buffers afresh, and glibc serves
blocks above 32 MB with a new mmap, so every step first-touches ~1 GB of 4 KB pages
(measured: 270,000 minor page faults per DiT bench step, ~13% of the step). With
the tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent
huge pages (madvise), and the faults drop 500-fold: the bench step goes from 2.37
to 2.08 s (docs/benchmarks.md "## DiT"). Tunables are read when a process starts,
so the command re-executes itself once with the variable set.

Off with VIDSIM_HUGEPAGES=0; skipped where it cannot help (not Linux, or
transparent huge pages disabled).
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_enabled() -> bool:
  """Whether the kernel gives transparent huge pages to those who ask (madvise or always)."""
  try:
    with open(THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _wanted(env) -> bool:
  if not sys.platform.startswith("linux") or env.get("VIDSIM_HUGEPAGES", "1") == "0":
    return False
  if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return False  # Already set, by us (the re-executed process) or by the user.
  return thp_enabled()


def tunables_with_hugepages(env) -> str:
  """GLIBC_TUNABLES with the huge-page tunable added to whatever is there."""
  current = env.get("GLIBC_TUNABLES", "")
  return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_hugepages():
  """Replace this process by the same command line with the tunable set (returns
  only when it is not wanted). Call before anything allocates much: first thing."""
  if not _wanted(os.environ):
    return
  os.environ["GLIBC_TUNABLES"] = tunables_with_hugepages(os.environ)
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the interpreter's own command line (python [-m vidsim | .../bin/vidsim] args).
  os.execv(sys.executable, sys.orig_argv)


def hugepages_active() -> bool:
  """Whether this process started with the tunable (for benchmark records)."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
