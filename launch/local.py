"""launch/local.sh: N vidsim processes on this machine, the same code path as a pod.

Every process gets the coordinator (127.0.0.1 on a free port), the process count and
its index through VIDSIM_COORDINATOR / VIDSIM_NUM_PROCESSES / VIDSIM_PROCESS_ID, K fake
CPU devices (XLA_FLAGS) and gloo collectives, exactly what jax.distributed gets on a
pod from its cluster. Output is streamed with a [pI] prefix and appended to
LOGS/process_I.log. The job's exit code is the first non-zero exit of a process; the
others then get --grace seconds to exit by themselves (they notice the lost peer:
docs/launch.md), then SIGTERM, then SIGKILL. SIGINT/SIGTERM to the launcher are passed
on as SIGTERM, which vidsim treats as a preemption: save, exit 0.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROG = "launch/local.sh"
KILL_AFTER_TERM_S = 10


def build_parser():
  p = argparse.ArgumentParser(
      prog=PROG, usage=f"{PROG} N [--devices-per-process K] [--logs DIR] [--grace S] [--port P] [--dry-run] "
      "-- vidsim COMMAND ...", description=__doc__.split("\n")[0])
  p.add_argument("processes", type=int, help="number of processes (N)")
  p.add_argument("--devices-per-process", type=int, default=4, help="fake CPU devices per process (default 4)")
  p.add_argument("--logs", default="", help="log directory (default: WORKDIR/logs, or ./logs when the workdir is gs://)")
  p.add_argument("--grace", type=float, default=30.0,
                 help="after the first failure, seconds the others get to exit by themselves (default 30)")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  p.add_argument("--dry-run", action="store_true", help="print each process's environment and command, run nothing")
  return p


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index, count, port, devices):
  """The variables that make process `index` one of `count` (what a pod's cluster provides)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
  return {
      "VIDSIM_COORDINATOR": f"127.0.0.1:{port}",
      "VIDSIM_NUM_PROCESSES": str(count),
      "VIDSIM_PROCESS_ID": str(index),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
      "PYTHONUNBUFFERED": "1",
  }


def default_logs(vidsim_args):
  workdir = common.option(vidsim_args, "--workdir")
  if workdir and "://" not in workdir:
    return os.path.join(workdir, "logs")
  return "logs"


def exit_code(returncode):
  """Popen's -SIG for a signal death -> the shell's 128 + SIG."""
  return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode):
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  return f"exited {returncode}"


class Job:
  """N child processes, their output pumps and their exits."""

  def __init__(self, argv, envs, logs):
    self.procs, self.pumps, self.exits = [], [], {}
    self.start = time.monotonic()
    header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {PROG}: {' '.join(argv)}\n"
    for index, env in enumerate(envs):
      log = open(os.path.join(logs, f"process_{index}.log"), "a", buffering=1)
      log.write(header)
      proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
      with open(os.path.join(logs, f"process_{index}.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
      pump = threading.Thread(target=self._pump, args=(index, proc, log), daemon=True)
      pump.start()
      self.procs.append(proc)
      self.pumps.append(pump)

  @staticmethod
  def _pump(index, proc, log):
    """Child output -> `[pI] line` on our stdout and the raw line in its log file."""
    for raw in iter(proc.stdout.readline, b""):
      line = raw.decode("utf-8", "replace")
      log.write(line)
      sys.stdout.write(f"[p{index}] {line}")
      sys.stdout.flush()
    log.close()

  def poll(self):
    """Records new exits; returns the indices still running."""
    for index, proc in enumerate(self.procs):
      if index not in self.exits and proc.poll() is not None:
        self.exits[index] = (proc.returncode, time.monotonic() - self.start)
        _say(f"process {index} {describe_exit(proc.returncode)} after {self.exits[index][1]:.1f} s")
    return [i for i in range(len(self.procs)) if i not in self.exits]

  def signal(self, indices, sig):
    for index in indices:
      try:
        os.killpg(self.procs[index].pid, sig)  # The child leads its own session: it and its helpers.
      except ProcessLookupError:
        pass

  def first_failure(self):
    failed = [(t, i, code) for i, (code, t) in self.exits.items() if code != 0]
    return min(failed) if failed else None


def run(job, grace):
  """Waits for every process; returns the job's exit code."""
  stop = {"requested": 0}

  def forward(signum, frame):
    stop["requested"] += 1
    running = job.poll()
    if stop["requested"] == 1:
      _say(f"{signal.Signals(signum).name}: asking processes {running} to save and stop (SIGTERM)")
      job.signal(running, signal.SIGTERM)
    else:
      _say("second signal: killing every process")
      job.signal(running, signal.SIGKILL)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  termed_at = None
  while True:
    running = job.poll()
    if not running:
      break
    failure = job.first_failure()
    now = time.monotonic() - job.start
    if failure and termed_at is None and now > failure[0] + grace:
      _say(f"processes {running} still running {grace:.0f} s after process {failure[1]} failed: SIGTERM")
      job.signal(running, signal.SIGTERM)
      termed_at = now
    elif termed_at is not None and now > termed_at + KILL_AFTER_TERM_S:
      _say(f"processes {running} ignored SIGTERM: SIGKILL")
      job.signal(running, signal.SIGKILL)
      termed_at = float("inf")
    time.sleep(0.1)
  for pump in job.pumps:
    pump.join(timeout=5)
  failure = job.first_failure()
  code = exit_code(failure[2]) if failure else 0
  _say(f"job exit {code}" + (f" (first failure: process {failure[1]})" if failure else ""))
  return code


def _say(message):
  print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv):
  launcher_args, command = common.split_command(argv)
  parser = build_parser()
  args = parser.parse_args(launcher_args)  # argparse: usage and exit 2 on a missing N.
  try:
    if args.processes < 1:
      raise common.LaunchUsage(f"N={args.processes}: need at least 1 process")
    if args.devices_per_process < 1:
      raise common.LaunchUsage(f"--devices-per-process={args.devices_per_process}: need at least 1")
    vidsim_args = common.vidsim_command(command)
  except common.LaunchUsage as e:
    return common.fail_usage(parser, str(e))
  python = os.environ.get("PYTHON") or sys.executable
  argv_child = [python, "-m", "vidsim", *vidsim_args]
  port = args.port or free_port()
  logs = args.logs or default_logs(vidsim_args)
  envs = [process_env(i, args.processes, port, args.devices_per_process) for i in range(args.processes)]
  if args.dry_run:
    for index, env in enumerate(envs):
      print(common.remote_command(vidsim_args, python=python, env=env) + f" > {os.path.join(logs, f'process_{index}.log')}")
    return 0
  os.makedirs(logs, exist_ok=True)
  _say(f"{args.processes} processes x {args.devices_per_process} CPU devices, coordinator 127.0.0.1:{port}, "
       f"logs in {logs}/process_*.log")
  return run(Job(argv_child, envs, logs), args.grace)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
