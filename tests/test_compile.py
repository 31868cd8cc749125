"""`vidsim compile`: AOT compiles for TPU topologies on CPU (libtpu compile-only devices).

The compiles are of digits_tiny-sized models (seconds each); pod configs are compiled
by hand (docs/scale.md), not here.
"""

import importlib.util
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from vidsim import cli, hlo_cost
from vidsim import topology as topology_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')
pytestmark = pytest.mark.tpu_aot

TINY = "experiments/digits_tiny.py"


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  """The tiny DiT's train step compiled for a v5p-8, through the command line."""
  out = tmp_path_factory.mktemp("compile") / "report.json"
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip('libtpu is not installed (pip install -e ".[tpu]")')
  code = cli.main(["compile", "--config", TINY, "--topology", "v5p-8", "--out", str(out)])
  assert code == 0
  return json.loads(out.read_text())


@needs_libtpu
def test_tiny_dit_compiles_for_v5p_8_and_reports_hbm_and_an_estimate(tiny_report):
  r = tiny_report
  assert r["fits"] and r["chips"] == 4 and r["hosts"] == 1 and r["device_kind"].startswith("TPU v5")
  assert r["mesh"] == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 1}
  hbm = r["hbm"]
  assert hbm["arguments_bytes"] > 0 and hbm["temporaries_bytes"] > 0 and hbm["generated_code_bytes"] > 0
  assert 0 < hbm["total_bytes"] < hbm["capacity_bytes"] == 95 * 1024**3
  e = r["estimate"]
  assert e["step_time_s"] > 0 and 0 < e["mfu"] < 1 and e["tokens_per_s_per_chip"] > 0
  assert "bound, not a measurement" in e["method"]
  # The settings that quiet libtpu's start, and those libtpu sets itself, are gone: a child
  # process (init_distributed, jax) would read them as a TPU pod host.
  assert "TPU_WORKER_HOSTNAMES" not in os.environ
  inherited = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
  assert "CLOUD_TPU_TASK_ID=" not in inherited and "TPU_WORKER_HOSTNAMES=" not in inherited


@needs_libtpu
def test_loop_corrected_flops_match_vidsims_count(tiny_report):
  """cost_analysis counts the layer scan's body once; scaled by the trip counts, the
  compiler's FLOPs come close to vidsim's model count (matmuls; plus elementwise work)."""
  c = tiny_report["compiler_cost_per_chip"]
  assert any(loop["trips"] == 2 for loop in c["loops"])  # digits_tiny has 2 DiT blocks.
  assert c["loop_flops_factor"] > 1.2
  ratio = c["flops_with_loops"] / tiny_report["model_flops_per_step_per_chip"]
  assert 0.9 < ratio < 1.5, ratio


@needs_libtpu
def test_too_large_for_its_topology_exits_3_naming_buffers_and_remedies(capsys):
  code = cli.main(["compile", "--config", TINY, "--topology", "v5e-4", "--config.dit.width=2048",
                   "--config.dit.depth=8", "--config.dit.heads=16", "--config.train.row_tokens=4096",
                   "--config.train.rows_per_batch=4"])
  err = capsys.readouterr().err
  assert code == 3, err
  assert "does not fit v5e-4" in err and "16.00 GiB" in err
  assert "largest buffers per chip" in err and "4096,4096]" in err  # The [L, L] attention scores.
  for remedy in ("dit.remat", "rows_per_batch", "mesh.ici.fsdp", "mesh.ici.sequence"):
    assert remedy in err


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips_is_exit_2_with_a_layout_that_would(capsys):
  code = cli.main(["compile", "--config", TINY, "--topology", "v5p-8", "--config.mesh.ici.data=3"])
  err = capsys.readouterr().err
  assert code == 2
  assert "needs 3 devices per slice but there are 4" in err and "for example" in err


@needs_libtpu
def test_batch_that_does_not_split_over_the_mesh_is_exit_2_naming_the_key(capsys):
  # v5p-8 is 4 chips, all data-parallel: 6 rows do not split 4 ways.
  code = cli.main(["compile", "--config", TINY, "--topology", "v5p-8", "--config.train.rows_per_batch=6"])
  err = capsys.readouterr().err
  assert code == 2
  assert "train.rows_per_batch=6 must be a multiple of 4" in err and "use train.rows_per_batch=8" in err


def test_unknown_topology_is_exit_2_listing_valid_ones(capsys):
  assert cli.main(["compile", "--config", TINY, "--topology", "v7x-8"]) == 2
  err = capsys.readouterr().err
  assert "unknown TPU topology 'v7x-8'" in err and "v5p-{8," in err and "v5litepod-" in err


def test_missing_libtpu_is_exit_2_saying_how_to_install(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  assert cli.main(["compile", "--config", TINY, "--topology", "v5p-8"]) == 2
  assert 'pip install -e ".[tpu]"' in capsys.readouterr().err


@pytest.mark.parametrize("name, slices, topology_name, chips, hosts, bounds", [
    ("v5p-64", 2, "v5p:2x4x4", 32, 8, (2, 2, 1)),
    ("v4-8", 1, "v4:2x2x1", 4, 1, (2, 2, 1)),
    ("v5litepod-8", 1, "v5e:2x4", 8, 1, (2, 4, 1)),
    ("v6e-64", 1, "v6e:8x8", 64, 16, (2, 2, 1)),
    ("v6e-1", 1, "v6e:1x1", 1, 1, (1, 1, 1)),
])
def test_topology_names_libtpu_accepts(name, slices, topology_name, chips, hosts, bounds):
  t = topology_lib.parse(name, slices)
  assert (t.topology_name, t.chips, t.hosts, t.chips_per_host_bounds) == (topology_name, chips, hosts, bounds)
  if importlib.util.find_spec("libtpu") is not None:
    from vidsim.compile import compile_only_devices

    devices = compile_only_devices(t)
    assert len(devices) == chips * slices
    assert len({d.process_index for d in devices}) == hosts * slices
    assert {getattr(d, "slice_index", 0) for d in devices} == set(range(slices))


def test_loop_factors_count_a_scan_body_its_trip_count():
  """On a CPU compile: a scan of 6 matmuls is 6x its body, plus one matmul outside."""

  def f(x, w):
    y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=6)
    return y @ w

  shape = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  text = jax.jit(f).lower(shape, shape).compile().as_text()
  factors = hlo_cost.loop_factors(text)
  assert [trips for _, trips in factors["loops"]] == [6]
  assert factors["matmul_flops"] == 7 * 2 * 64**3
  assert factors["flops"] == pytest.approx(7 / 2)
