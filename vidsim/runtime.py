"""What every command does around its work: the compilation cache at start, and what a
process of a multi-process job does when another process is lost.

`start(args, config)` sets the CPU backend's device count (`config.mesh.cpu_devices`)
and turns on jax's persistent compilation cache (`config.compile_cache_dir`,
"{workdir}" = the command's --workdir), so a restarted or preempted job reads its
compiled steps instead of paying the compile again.

`exit_if_peer_lost(error)` runs when a command fails with an unexpected error in a job
of several processes. A dead peer shows up as a failed collective (gloo: "Connection
closed by peer"; on TPU the step may just stall). The coordination service declares a
process dead once it has sent no heartbeat for `distributed.heartbeat_timeout_s`; this
asks it which processes are alive, prints the lost ones, and exits at once: the normal
exit path would wait in jax's shutdown barrier for a process that will never come.
"""

import os
import sys
import threading
import traceback

from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger("runtime")

# Exit code of a process whose job lost another process (the generic failure code).
LOST_PEER_EXIT = 1


# ------------------------------------------------------------------ compilation cache


def compile_cache_path(config, workdir) -> str:
  """config.compile_cache_dir with "{workdir}" filled in; '' when off (or no workdir to fill)."""
  path = str(config.get("compile_cache_dir", "") or "")
  if "{workdir}" in path:
    if not workdir:
      return ""  # Commands without a workdir (config, data, bench) cache only when given a path.
    path = path.replace("{workdir}", str(workdir).rstrip("/"))
  return path


def enable_compile_cache(path: str, min_compile_s: float) -> None:
  """jax's persistent cache at `path` (local or gs://, through etils.epath)."""
  import jax

  if not path.startswith("gs://"):
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
  log.info("compilation cache: %s (computations compiled in over %.1f s)", path, min_compile_s)


def cpu_processes(config) -> int:
  """The process count of a job of CPU processes (gloo collectives), else 0."""
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] != "cpu":
    return 0
  return int(config.distributed.num_processes or os.environ.get("VIDSIM_NUM_PROCESSES", "0") or 0)


def set_cpu_devices(config) -> None:
  """config.mesh.cpu_devices host devices on the CPU backend, if it is not up yet (a
  command's own process). A process whose backend already runs (tests, notebooks) keeps
  its devices, and a count in XLA_FLAGS (launch/local.sh, tests) wins over the config."""
  import jax

  count = int(config.mesh.get("cpu_devices", 0) or 0)
  if count < 0:
    raise UsageError(f"mesh.cpu_devices must be >= 0 (0 = jax's default), got {count}")
  if not count:
    return
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    log.info("mesh.cpu_devices=%d not applied: XLA_FLAGS sets the device count", count)
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # jax refuses once a backend is up.
    log.info("mesh.cpu_devices=%d not applied: jax already runs with %d devices", count, jax.device_count())


def start(args, config) -> None:
  """Start-up of every command that has a config: before anything compiles."""
  if config is None:
    return
  set_cpu_devices(config)
  path = compile_cache_path(config, getattr(args, "workdir", ""))
  if path and cpu_processes(config) > 1:
    # Several CPU processes resuming with executables from the cache failed at their
    # first step, 2 runs of 3, with "Gloo context initialization failed:
    # DEADLINE_EXCEEDED" (the processes set up different gloo contexts); the same resume
    # without the cache went through. Off there until that is understood; TPU jobs keep it.
    log.info("compilation cache: off for a job of %d CPU processes (gloo)", cpu_processes(config))
    return
  if path:
    enable_compile_cache(path, config.compile_cache_min_compile_s)


# ------------------------------------------------------------------ lost processes


def _distributed_client():
  """jax's coordination-service client, or None in a one-process run.

  jax keeps it in a private module (jax.distributed exposes no getter); it is the
  only handle on the service's view of which processes are alive.
  """
  from jax._src import distributed

  state = distributed.global_state
  if state.client is None or not state.num_processes or state.num_processes < 2:
    return None
  return state


def alive_processes(state, timeout_s: float):
  """Process ids the coordination service reports alive, or None if it gave no answer in time.

  `get_live_nodes` waits until every process still alive has asked too, or has been
  declared dead (no heartbeat for heartbeat_timeout_s), so it is run on a thread
  with a deadline: a peer stuck in a collective never asks.
  """
  answer = {}

  def ask():
    try:
      answer["alive"] = sorted(state.client.get_live_nodes(list(range(state.num_processes))))
    except Exception as e:  # The coordinator itself (process 0) is gone: its RPCs fail.
      answer["error"] = e

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if "error" in answer:
    raise answer["error"]
  return answer.get("alive")


def exit_if_peer_lost(error, config) -> None:
  """In a multi-process job: report which processes were lost, then exit without waiting
  for them. Returns (does nothing) in a one-process run."""
  state = _distributed_client()
  if state is None:
    return
  me, count = state.process_id, state.num_processes
  heartbeat = int(config.distributed.heartbeat_timeout_s) if config is not None else 100
  traceback.print_exception(error, file=sys.stderr)
  first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  _say(f"process {me} of {count} failed: {type(error).__name__}: {first_line}")
  _say(f"asking the coordinator which processes are alive (a lost one is declared dead after "
       f"distributed.heartbeat_timeout_s={heartbeat} s)")
  try:
    alive = alive_processes(state, heartbeat + 15)
  except Exception as e:
    _say(f"lost the coordinator (process 0): {str(e).strip().splitlines()[0][:200]}; this job cannot go on. "
         "The last committed checkpoint is intact: re-run the same command to resume.")
    _exit(LOST_PEER_EXIT)
  if alive is None:
    _say(f"the coordinator gave no answer in {heartbeat + 15} s; the error above is this process's own")
  else:
    lost = [p for p in range(count) if p not in alive]
    if lost:
      _say(f"lost process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {count} "
           "(no heartbeat): this job cannot go on. The last committed checkpoint is intact: re-run the "
           "same command, on this or another process count, to resume.")
    else:
      _say(f"all {count} processes are alive; the error above is this process's own")
  _exit(LOST_PEER_EXIT)


def _say(message):
  print(f"vidsim: error: {message}", file=sys.stderr, flush=True)


def _exit(code):
  """Exit now: the shutdown barrier would wait for the lost process (shutdown_timeout_s),
  and an unfinished checkpoint cannot commit without it anyway."""
  for handler in log.parent.handlers if log.parent else []:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
