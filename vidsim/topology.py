"""TPU slices by the names users type: chips, hosts, chip shape, HBM and peak rates.

`parse("v5p-64", slices=2)` -> Topology. The launchers (`launch/`) and `vidsim compile`
read this one table. Names follow Cloud TPU's accelerator types: v4-N and v5p-N count
TensorCores (2 per chip, one JAX device per chip in megacore mode), v5e-N /
v5litepod-N and v6e-N count chips. Per-chip figures are Google's published specs.

`python -m vidsim.topology v5p-64 [--slices 2]` prints the parsed slice as JSON (the
shell launchers use it).
"""

import argparse
import dataclasses
import json
import math
import re
import sys

from vidsim.errors import UsageError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # As in libtpu's topology names: v4, v5p, v5e, v6e.
  aliases: tuple  # Accelerator-type prefixes users type.
  cores_per_chip: int  # What N in "<name>-N" counts per chip.
  dims: int  # 3 = 3D torus (v4, v5p), 2 = 2D (v5e, v6e).
  chip_counts: tuple  # Slice sizes sold, in chips.
  single_host_max_chips: int  # Slices up to this size are one host.
  chips_per_host: int  # On multi-host slices.
  hbm_bytes: int  # Per chip.
  peak_bf16_flops: float  # Per chip, dense.
  hbm_bytes_per_s: float  # Per chip.
  ici_bytes_per_s: float  # Per chip, all links together, one direction.
  chip_config: str  # get_topology_desc's chip_config_name.
  gke_accelerator: str  # GKE node selector cloud.google.com/gke-tpu-accelerator.
  machine_type: str  # GCE/GKE machine type of a multi-host slice's VM.
  runtime_version: str  # TPU VM software version.


def _powers_of_two(lo, hi):
  return tuple(2**i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1))


GENERATIONS = {
    g.name: g
    for g in (
        Generation(
            "v4", ("v4",), 2, 3, _powers_of_two(4, 4096), 4, 4, 32 * GIB, 275e12, 1.2e12, 0.3e12,
            "megacore", "tpu-v4-podslice", "ct4p-hightpu-4t", "tpu-ubuntu2204-base",
        ),
        Generation(
            "v5p", ("v5p",), 2, 3, _powers_of_two(4, 8192), 4, 4, 95 * GIB, 459e12, 2.765e12, 0.6e12,
            "megacore", "tpu-v5p-slice", "ct5p-hightpu-4t", "v2-alpha-tpuv5",
        ),
        Generation(
            "v5e", ("v5e", "v5litepod"), 1, 2, (1, 4, 8, 16, 32, 64, 128, 256), 8, 4, 16 * GIB, 197e12,
            0.819e12, 0.2e12, "default", "tpu-v5-lite-podslice", "ct5lp-hightpu-4t", "v2-alpha-tpuv5-lite",
        ),
        Generation(
            "v6e", ("v6e",), 1, 2, (1, 4, 8, 16, 32, 64, 128, 256), 8, 4, 32 * GIB, 918e12,
            1.64e12, 0.448e12, "default", "tpu-v6e-slice", "ct6e-standard-4t", "v2-alpha-tpuv6e",
        ),
    )
}
_ALIASES = {alias: g for g in GENERATIONS.values() for alias in g.aliases}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One or more identical slices of one TPU generation (slices talk over DCN)."""

  name: str  # Canonical accelerator type, e.g. "v5p-64".
  generation: Generation
  chips: int  # Per slice.
  shape: tuple  # Chips per slice along each ICI dimension.
  slices: int = 1

  @property
  def hosts(self) -> int:
    """Hosts (VMs, JAX processes) per slice."""
    g = self.generation
    return 1 if self.chips <= g.single_host_max_chips else self.chips // g.chips_per_host

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def total_chips(self) -> int:
    return self.chips * self.slices

  @property
  def total_hosts(self) -> int:
    return self.hosts * self.slices

  @property
  def topology_name(self) -> str:
    """libtpu's name for one slice, e.g. "v5p:2x4x4" (get_topology_desc)."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple:
    """get_topology_desc's chips_per_host_bounds: always three numbers (libtpu 0.0.42
    rejects two for v5e / v6e), the whole slice when it is one host (a v5e-8 host has
    8 chips as 2x4; libtpu's default 2x2x1 would make it two hosts), else 2x2x1."""
    if self.hosts == 1:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  @property
  def accelerator_type(self) -> str:
    """The name `gcloud compute tpus` takes (v5e is "v5litepod-N" there)."""
    prefix = "v5litepod" if self.generation.name == "v5e" else self.generation.name
    return f"{prefix}-{self.chips * self.generation.cores_per_chip}"

  def as_dict(self) -> dict:
    g = self.generation
    return {
        "name": self.name,
        "accelerator_type": self.accelerator_type,
        "generation": g.name,
        "slices": self.slices,
        "chips_per_slice": self.chips,
        "hosts_per_slice": self.hosts,
        "chips_per_host": self.chips_per_host,
        "total_chips": self.total_chips,
        "total_hosts": self.total_hosts,
        "shape": list(self.shape),
        "topology_name": self.topology_name,
        "chips_per_host_bounds": list(self.chips_per_host_bounds),
        "hbm_bytes_per_chip": g.hbm_bytes,
        "peak_bf16_flops_per_chip": g.peak_bf16_flops,
        "hbm_bytes_per_s_per_chip": g.hbm_bytes_per_s,
        "gke_accelerator": g.gke_accelerator,
        "machine_type": g.machine_type,
        "runtime_version": g.runtime_version,
    }


def chip_shape(generation: Generation, chips: int) -> tuple:
  """The ICI shape of a slice: 3D slices grow 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4
  ..., 2D ones 2x2 -> 2x4 -> 4x4 -> 4x8 ... (double the smallest dimension, the last
  one on ties), which is how Cloud TPU lays out its standard slices."""
  if generation.dims == 2 and chips == 1:
    return (1, 1)
  shape = [2, 2, 1] if generation.dims == 3 else [2, 2]
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, d in enumerate(shape) if d == smallest)] *= 2
  return tuple(shape)


def known_names() -> list:
  """Every accelerator type parse() accepts, for error messages."""
  names = []
  for g in GENERATIONS.values():
    sizes = [c * g.cores_per_chip for c in g.chip_counts]
    for alias in g.aliases:
      names.append(f"{alias}-{{{','.join(map(str, sizes))}}}")
  return names


def parse(name: str, slices: int = 1) -> Topology:
  """"v5p-64" / "v5litepod-16" / "v6e-256" (+ slices over DCN) -> Topology."""
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  generation = _ALIASES.get(match.group(1)) if match else None
  if generation is None:
    raise UsageError(f"unknown TPU topology {name!r}; known: {'; '.join(known_names())}")
  count = int(match.group(2))
  chips, rest = divmod(count, generation.cores_per_chip)
  if rest or chips not in generation.chip_counts:
    sizes = ", ".join(str(c * generation.cores_per_chip) for c in generation.chip_counts)
    raise UsageError(f"{name!r}: {generation.name} slices come in sizes {sizes}")
  if slices < 1:
    raise UsageError(f"slices={slices}: need at least 1")
  canonical = f"{generation.name}-{count}"
  return Topology(canonical, generation, chips, chip_shape(generation, chips), slices)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vidsim.topology", description=__doc__.split("\n")[0])
  parser.add_argument("name", help="accelerator type, e.g. v5p-64, v5litepod-16, v6e-256")
  parser.add_argument("--slices", type=int, default=1, help="slices over DCN (default 1)")
  args = parser.parse_args(argv)
  try:
    topology = parse(args.name, args.slices)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(topology.as_dict(), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
