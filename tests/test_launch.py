"""launch/: dry runs on several TPU topologies, bad input, the local multi-process launcher,
a host killed mid-run, and the persistent compilation cache.

No cloud command ever runs: gcloud, kubectl and xpk are shadowed on PATH by scripts
that record the call, and every test checks that none was made.
"""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vidsim.errors import UsageError
from vidsim.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent

LOCAL = str(REPO / "launch" / "local.sh")
TPU_VM = str(REPO / "launch" / "tpu_vm.sh")
GKE = str(REPO / "launch" / "gke" / "render.sh")

# Cloud TPU's published slice sizes: (accelerator, slices) -> (hosts per slice, chips per host, ICI shape).
SLICES = {
    ("v5p-64", 1): (8, 4, "2x4x4"),
    ("v5e-256", 1): (64, 4, "16x16"),
    ("v6e-64", 1): (16, 4, "8x8"),
    ("v5p-256", 2): (32, 4, "4x4x8"),
}
GKE_ACCELERATOR = {"v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
COMMAND = ["vidsim", "train", "--config", "experiments/digits_demo.py", "--workdir", "gs://bucket/run1"]


@pytest.fixture
def launcher_env(tmp_path):
  """Env for the launchers: this interpreter, and cloud CLIs that only record that they were called."""
  fake_bin = tmp_path / "fake_bin"
  fake_bin.mkdir()
  calls = tmp_path / "cloud_calls"
  for tool in ("gcloud", "kubectl", "xpk"):
    script = fake_bin / tool
    script.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\nexit 1\n")
    script.chmod(0o755)
  env = dict(os.environ, PYTHON=sys.executable, PATH=f"{fake_bin}:{os.environ['PATH']}")
  yield env
  assert not calls.exists(), f"a launcher called a cloud tool: {calls.read_text()}"


def launch(script, args, env, **kwargs):
  return subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=120, **kwargs)


# ------------------------------------------------------------------ dry runs


@pytest.mark.parametrize("accelerator,slices", list(SLICES))
def test_gke_manifest_gives_every_host_its_chips_and_the_same_command(accelerator, slices, launcher_env):
  hosts, chips, shape = SLICES[(accelerator, slices)]
  result = launch(GKE, ["--name", "run1", "--accelerator", accelerator, "--slices", str(slices),
                        "--image", "registry/vidsim:1", "--dry-run", "--", *COMMAND], launcher_env)
  assert result.returncode == 0, result.stderr
  manifest = yaml.safe_load(result.stdout)
  assert manifest["kind"] == "JobSet"
  (slice_job,) = manifest["spec"]["replicatedJobs"]
  job = slice_job["template"]["spec"]
  pod = job["template"]["spec"]
  (container,) = pod["containers"]
  assert slice_job["replicas"] == slices
  assert job["parallelism"] == job["completions"] == hosts
  assert container["resources"]["limits"]["google.com/tpu"] == chips
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[accelerator.split("-")[0]],
                                 "cloud.google.com/gke-tpu-topology": shape}
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["VIDSIM_COORDINATOR"] == "run1-slice-0-0.run1:8482"
  assert env["VIDSIM_NUM_PROCESSES"] == str(hosts * slices)
  assert env["MEGASCALE_NUM_SLICES"] == str(slices)
  # One pod template: every host runs this one line.
  (line,) = container["args"]
  prefix, vidsim = line.split("exec ", 1)
  expected = ["python3", "-m", "vidsim", *COMMAND[1:]] + ([f"--config.mesh.dcn.data={slices}"] if slices > 1 else [])
  assert shlex.split(vidsim) == expected
  # The line's process ids, evaluated by bash for every (slice, pod): 0 .. hosts x slices - 1, once each.
  loop = (f"for MEGASCALE_SLICE_ID in $(seq 0 {slices - 1}); do for JOB_COMPLETION_INDEX in $(seq 0 {hosts - 1}); "
          f"do HOSTS_PER_SLICE={hosts}; {prefix} echo $VIDSIM_PROCESS_ID; done; done")
  ids = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, check=True).stdout.split()
  assert sorted(map(int, ids)) == list(range(hosts * slices))
  xpk = next(line for line in result.stdout.splitlines() if "xpk workload create" in line)
  assert f"--num-slices={slices}" in xpk and "--docker-image=registry/vidsim:1" in xpk


@pytest.mark.parametrize("accelerator,slices", list(SLICES))
def test_tpu_vm_dry_run_creates_the_slices_and_runs_one_command_on_all_workers(accelerator, slices, launcher_env):
  hosts, chips, _ = SLICES[(accelerator, slices)]
  result = launch(TPU_VM, ["--name", "run1", "--zone", "us-east5-a", "--accelerator", accelerator, "--slices",
                           str(slices), "--spot", "--delete", "--dry-run", "--", *COMMAND], launcher_env)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
  assert f"{hosts} hosts x {chips} chips per slice, {hosts * slices} workers" in result.stdout
  (create,) = [line for line in lines if " create " in line]
  (delete,) = [line for line in lines if " delete " in line]
  if slices > 1:
    assert "queued-resources create run1" in create and f"--node-count={slices}" in create
    assert "queued-resources delete run1" in delete
  else:
    assert "tpu-vm create run1" in create and "--node-count" not in create
  assert "--spot" in create
  ssh = [line for line in lines if " ssh " in line]
  assert len(ssh) == 2  # Install, then run: each once, on every worker.
  for line in ssh:
    assert "--worker=all" in line and (("--node=all" in line) == (slices > 1))
  run = shlex.split(ssh[1])[-1]
  assert run.startswith("--command=")
  vidsim = re.search(r"-m vidsim (.*?) 2>&1", run).group(1)
  expected = COMMAND[1:] + ([f"--config.mesh.dcn.data={slices}"] if slices > 1 else [])
  assert shlex.split(vidsim) == expected


def test_local_dry_run_gives_each_process_its_id(launcher_env):
  result = launch(LOCAL, ["3", "--devices-per-process", "2", "--port", "4567", "--dry-run", "--",
                          "vidsim", "train", "--config", "c.py", "--workdir", "/tmp/w"], launcher_env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  for pid, line in enumerate(lines):
    assert f"VIDSIM_PROCESS_ID={pid} " in line and "VIDSIM_NUM_PROCESSES=3" in line
    assert "VIDSIM_COORDINATOR=127.0.0.1:4567" in line and "--xla_force_host_platform_device_count=2" in line
    assert line.endswith(f"-m vidsim train --config c.py --workdir /tmp/w > /tmp/w/logs/process_{pid}.log")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("script,args,message", [
    (LOCAL, ["--", *COMMAND], "required: processes"),
    (LOCAL, ["2", "--", "python", "train.py"], "not a vidsim command"),
    (LOCAL, ["2", "--", "vidsim", "trian"], "unknown vidsim command 'trian'; known: config"),
    (LOCAL, ["2"], "no command"),
    (TPU_VM, ["--zone", "z", "--accelerator", "v5p-64", "--", *COMMAND], "required: --name"),
    (TPU_VM, ["--name", "n", "--zone", "z", "--accelerator", "v5p-63", "--", *COMMAND], "v5p slices come in sizes"),
    (TPU_VM, ["--name", "n", "--zone", "z", "--accelerator", "tpu9-8", "--", *COMMAND], "known: v4-{8,16"),
    (TPU_VM, ["--name", "n", "--zone", "z", "--accelerator", "v5p-64", "--", "bash", "-c", "rm -rf /"],
     "not a vidsim command"),
    (TPU_VM, ["--name", "n", "--zone", "z", "--accelerator", "v5p-64", "--", *COMMAND[:-1], "/tmp/run"],
     "8 hosts must share the workdir"),
    (GKE, ["--name", "n", "--accelerator", "v6e-64", "--", *COMMAND], "required: --image"),
    (GKE, ["--name", "n", "--accelerator", "v7x-64", "--image", "i", "--", *COMMAND], "unknown TPU topology 'v7x-64'"),
    (GKE, ["--name", "n", "--accelerator", "v6e-64", "--image", "i", "--", "kubectl", "delete", "all"],
     "not a vidsim command"),
])
def test_bad_input_prints_usage_and_exits_2_before_anything_runs(script, args, message, launcher_env):
  result = launch(script, args, launcher_env)  # Never --dry-run: nothing may run anyway.
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "usage:" in result.stderr and message in result.stderr, result.stderr
  assert result.stdout == ""


# ------------------------------------------------------------------ a real local job, a dead host


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  env = dict(os.environ, VIDSIM_DATA_DIR=str(data_dir), PYTHON=sys.executable)
  config = str(REPO / "experiments" / "digits_tiny.py")
  subprocess.run([sys.executable, "-m", "vidsim", "data", "prepare", "--config", config], env=env, check=True,
                 capture_output=True, timeout=300)
  return env


HEARTBEAT_S = 10
# A VAE run long enough to be killed mid-way: checkpoints at 4 and 8 of 10 steps.
TINY = ["--config", str(REPO / "experiments" / "digits_tiny.py"), "--config.vae_train.recon_every=0",
        "--config.vae_train.final_eval=false", "--config.peak_flops_per_device=1e10", "--config.checkpoint.async_save=false",
        "--config.data.buckets=((5, 16, 16),)", "--config.vae_train.steps=10", "--config.vae_train.checkpoint_every=4",
        "--config.vae_train.log_every=1", f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_process_stops_the_other_within_the_bound_and_the_run_resumes_on_one(tmp_path, data_env):
  """local.sh runs 2 processes x 4 devices; process 1 is SIGKILLed after the step-4 checkpoint.
  Process 0 must exit non-zero naming process 1 within the heartbeat bound (not hang); step 4
  stays intact; the same command on 1 process x 8 devices resumes and logs the losses of a
  run that was never interrupted."""
  workdir, reference = tmp_path / "run", tmp_path / "reference"
  job = subprocess.Popen([LOCAL, "2", "--devices-per-process", "4", "--grace", "600", "--", "vidsim", "train-vae",
                          "--workdir", str(workdir), *TINY], env=data_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  committed = workdir / "vae" / "checkpoints" / "4" / "commit_success.txt"
  deadline = time.monotonic() + 600
  while not committed.exists() and job.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert committed.exists(), "no step-4 checkpoint"
  os.kill(int((workdir / "logs" / "process_1.pid").read_text()), signal.SIGKILL)
  killed_at = time.monotonic()
  out, err = job.communicate(timeout=HEARTBEAT_S + 120)
  survivor_s = time.monotonic() - killed_at

  assert job.returncode == 128 + signal.SIGKILL, err  # The first failure: process 1.
  assert re.search(r"process 0 (exited [1-9]|killed by SIGABRT)", err), err
  assert "SIGTERM" not in err  # Process 0 stopped by itself, not by the launcher.
  assert survivor_s < HEARTBEAT_S + 60, survivor_s
  # Named by vidsim (a Python-visible failure) or by jax's coordination service (stuck in a collective).
  survivor_log = (workdir / "logs" / "process_0.log").read_text()
  assert (re.search(r"lost process 1 of 2", survivor_log)
          or re.search(r"stopped sending heartbeats\):\s*1\b", survivor_log)), survivor_log[-3000:]
  assert "[p0] " in out and "[p1] " in out  # Live output, prefixed per process.
  steps = sorted(int(p.name) for p in (workdir / "vae" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 10 and 4 in steps
  assert "compilation cache: off for a job of 2 CPU processes" in survivor_log

  # The same command on one process resumes; an uninterrupted one-process run is the reference.
  # The reference loads what the resumed run compiled (same layout) from that run's cache.
  for target, cache in ((workdir, []), (reference, [f"--config.compile_cache_dir={workdir}/compile_cache"])):
    result = subprocess.run([LOCAL, "1", "--devices-per-process", "8", "--", "vidsim", "train-vae", "--workdir",
                             str(target), *TINY, *cache], env=data_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from step {steps[-1]}" in (workdir / "logs" / "process_0.log").read_text()
  assert any((workdir / "compile_cache").iterdir())  # One process: the default cache under the workdir.
  expected = read_metrics(reference / "vae" / "metrics.jsonl")
  resumed = read_metrics(workdir / "vae" / "metrics.jsonl")
  assert [r["step"] for r in resumed] == [r["step"] for r in expected] == list(range(1, 11))
  for a, b in zip(expected, resumed):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


# ------------------------------------------------------------------ compilation cache

_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp
from vidsim import config as config_lib, runtime
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
config = config_lib.load_config(sys.argv[1], ["--config.compile_cache_min_compile_s=0"])
runtime.start(type("Args", (), {"workdir": sys.argv[2]})(), config)
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
print(events.count("/jax/compilation_cache/cache_hits"), events.count("/jax/compilation_cache/cache_misses"))
"""


def test_second_start_reads_the_compile_cache_under_the_workdir(tmp_path):
  """The default config.compile_cache_dir is W/compile_cache: the first process writes it,
  the second (a restart) gets every compilation from it."""
  config = str(REPO / "experiments" / "digits_tiny.py")
  env = dict(os.environ, PYTHONPATH=str(REPO))

  def start():
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, config, str(tmp_path / "w")], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return tuple(map(int, out.split()))

  hits, misses = start()
  assert hits == 0 and misses > 0
  entries = list((tmp_path / "w" / "compile_cache").iterdir())
  assert len(entries) == misses
  assert start() == (misses, 0)


def test_empty_compile_cache_dir_turns_it_off(tiny_config):
  from vidsim import runtime

  assert runtime.compile_cache_path(tiny_config, "gs://b/run") == "gs://b/run/compile_cache"
  assert runtime.compile_cache_path(tiny_config, "") == ""  # No workdir to put it under.
  with tiny_config.unlocked():
    tiny_config.compile_cache_dir = ""
  assert runtime.compile_cache_path(tiny_config, "/tmp/w") == ""


_DEVICES_PROBE = """
import sys
from vidsim import config as config_lib, runtime
config = config_lib.load_config(sys.argv[1], sys.argv[2:])
runtime.start(type("Args", (), {"workdir": ""})(), config)
import jax
print(jax.device_count(), jax.devices()[0].platform)
"""


@pytest.mark.parametrize("overrides, xla_flags, expected", [
    ([], "", "1 cpu"),
    (["--config.mesh.cpu_devices=2"], "", "2 cpu"),
    (["--config.mesh.cpu_devices=2"], "--xla_force_host_platform_device_count=3", "3 cpu"),  # The environment wins.
])
def test_cpu_devices_sets_the_host_device_count_of_a_fresh_process(overrides, xla_flags, expected):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, "-c", _DEVICES_PROBE, str(REPO / "experiments" / "digits_tiny.py"), *overrides],
                       env=env, capture_output=True, text=True, timeout=120, check=True).stdout
  assert out.strip() == expected


def test_cpu_devices_leaves_a_running_backend_alone_and_rejects_negative_counts(tiny_config):
  import jax

  from vidsim import runtime

  before = jax.device_count()
  with tiny_config.unlocked():
    tiny_config.mesh.cpu_devices = before + 1
  runtime.set_cpu_devices(tiny_config)  # Logs, does not raise: this process's backend is up.
  assert jax.device_count() == before
  with tiny_config.unlocked():
    tiny_config.mesh.cpu_devices = -1
  with pytest.raises(UsageError, match="mesh.cpu_devices"):
    runtime.set_cpu_devices(tiny_config)


_ALLGATHER_LOOP = """
import sys, time
import numpy as np
from jax.experimental import multihost_utils
from vidsim import config as config_lib, mesh, runtime
config = config_lib.load_config(sys.argv[1], ["--config.distributed.heartbeat_timeout_s=5"])
mesh.init_distributed(config)
try:
  for i in range(100000):
    multihost_utils.process_allgather(np.asarray(i))
    if i == 20:
      print("collectives running", flush=True)
    time.sleep(0.01)
except Exception as e:
  runtime.exit_if_peer_lost(e, config)
"""


@pytest.mark.multiprocess
def test_a_failed_collective_names_the_lost_process_and_exits_without_waiting(tmp_path):
  """When the loss shows up in Python (a failed collective), vidsim asks the coordination
  service which process is gone, names it and exits 1 at once."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  config = str(REPO / "experiments" / "digits_tiny.py")
  procs = []
  for pid in range(2):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="",
               VIDSIM_COORDINATOR=f"127.0.0.1:{port}", VIDSIM_NUM_PROCESSES="2", VIDSIM_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, "-c", _ALLGATHER_LOOP, config], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  for line in procs[0].stdout:  # gloo prints its own lines first.
    if line.strip() == "collectives running":
      break
  else:
    pytest.fail(f"process 0 ended before its collectives ran: {procs[0].stderr.read()[-3000:]}")
  procs[1].kill()
  killed_at = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  assert procs[0].returncode == 1, err[-3000:]
  assert "vidsim: error: lost process 1 of 2" in err, err[-3000:]
  assert time.monotonic() - killed_at < 5 + 30
  procs[1].wait()
