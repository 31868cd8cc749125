"""Metrics of a training stage: one JSON line per logged step and TensorBoard events.

`W/<stage>/metrics.jsonl` is what scripts and the demo report read; TensorBoard gets
the same scalars. Only process 0 writes. On resume, lines past the restored step are
dropped so the file tells the history of the run that survived.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vidsim.log import is_chief


class MetricsWriter:

  def __init__(self, stage_dir, resume_step: int = 0):
    self.path = epath.Path(stage_dir) / "metrics.jsonl"
    self.enabled = is_chief()
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # Event files only; no TensorFlow needed.

    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

  def _truncate_after(self, step):
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in row.items():
      if name != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _scalar(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def read_metrics(path) -> list:
  """All rows of a metrics.jsonl file."""
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


# ------------------------------------------------------------------ MFU


def measure_matmul_flops_per_s(size: int = 2048, min_seconds: float = 1.0, dtype=jnp.float32) -> float:
  """FLOP/s of a large matmul (fp32 unless `dtype` says) on one device: the ceiling MFU
  is measured against.

  On CPU there is no published peak, so the measured rate of the operation the models
  are made of is the honest denominator. Measure it in the same process as the model,
  as the median over at least `min_seconds` of back-to-back matmuls (a single short
  matmul is at the mercy of whatever else the machine is doing).
  """
  key = jax.random.key(0)
  a = jax.random.normal(key, (size, size), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  start = time.perf_counter()
  while len(times) < 5 or time.perf_counter() - start < min_seconds:
    begin = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - begin)
  return 2 * size**3 / float(np.median(times))


# Published dense bf16 peaks per chip, for MFU on accelerators (the H100 / H200 figure is
# the SXM part's; jax names the PCIe H100 "NVIDIA H100 PCIe", which does not match).
_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
               "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


def published_peak_flops_per_s(device_kind: str):
  """The chip's published dense bf16 FLOP/s, or None for a chip not in the table (CPUs)."""
  for name, peak in _PEAK_FLOPS.items():
    if device_kind.startswith(name):
      return peak
  return None


def peak_flops_per_s(config) -> float:
  """FLOP/s of the whole job for MFU: configured, a known accelerator peak, or measured.

  On CPU the fake host devices share the same cores, so the ceiling is one measured
  matmul rate for the process, not one per device.
  """
  if config.peak_flops_per_device > 0:
    return config.peak_flops_per_device * jax.device_count()
  peak = published_peak_flops_per_s(jax.devices()[0].device_kind)
  if peak:
    return peak * jax.device_count()
  return measure_matmul_flops_per_s() * jax.process_count()


class StepTimer:
  """Wall time per step, excluding the first (compilation) step of each shape."""

  def __init__(self):
    self._last = None

  @property
  def first(self) -> bool:
    """No lap yet: the next step is this process's first (it compiles)."""
    return self._last is None

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed = None if self._last is None else now - self._last
    self._last = now
    return elapsed

  def restart(self) -> None:
    """The next lap starts now: work done since the last lap (hooks, checkpoint saves) is not step time."""
    if self._last is not None:
      self._last = time.perf_counter()
