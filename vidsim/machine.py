"""What machine a figure was measured on: every benchmark and compile report names it."""

import os
import platform


def cpu_model() -> str:
  """`lscpu`'s model name (platform.processor() is empty on many Linux hosts)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cores() -> int:
  """CPU cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
