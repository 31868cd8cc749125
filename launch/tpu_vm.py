"""launch/tpu_vm.sh: a vidsim command on every worker of Cloud TPU VMs.

Stages, in order (--stages picks some; --delete adds the last):
  create   a TPU VM (`tpu-vm create`), or a queued resource (`queued-resources create`,
           always for --slices > 1: one node per slice, --node-count), then waits until
           it is ACTIVE
  install  this checkout (tracked and untracked, not ignored files) to ~/vidsim on every
           worker, into a Python 3.11 venv ~/vidsim-venv with the [tpu] extra (uv)
  run      the command on all workers at once (`ssh --worker=all`); output streams here
           with a [hostname] prefix and is kept in ~/vidsim-logs/ on each worker
  logs     copies every worker's ~/vidsim-logs/ to --logs (default logs/NAME)
  delete   deletes the TPU VM or queued resource (also after a failed run)

jax finds the coordinator, process count and index (and, on multi-slice, the DCN
peers) from the TPU VM metadata; with --slices N the command gets
--config.mesh.dcn.data=N unless it sets mesh.dcn itself. --dry-run prints every
command and runs none.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROG = "launch/tpu_vm.sh"
STAGES = ("create", "install", "run", "logs", "delete")
REMOTE_DIR = "~/vidsim"
REMOTE_VENV = "~/vidsim-venv"
REMOTE_LOGS = "vidsim-logs"
POLL_S = 30


def build_parser():
  p = argparse.ArgumentParser(
      prog=PROG, usage=f"{PROG} --name NAME --zone ZONE --accelerator TYPE [--slices N] [options] -- vidsim COMMAND ...",
      description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True, help="TPU VM / queued resource name")
  p.add_argument("--zone", required=True, help="zone, e.g. us-east5-a")
  p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64, v5litepod-256, v6e-64")
  p.add_argument("--slices", type=int, default=1, help="slices over DCN (queued resource with --node-count; default 1)")
  p.add_argument("--runtime-version", default="", help="TPU software version (default: the generation's, vidsim.topology)")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="spot capacity (can be preempted at any time)")
  capacity.add_argument("--reserved", action="store_true", help="capacity from the project's reservation")
  p.add_argument("--queued", action="store_true", help="a queued resource even for one slice (waits for capacity)")
  p.add_argument("--stages", default="create,install,run,logs", help=f"comma-separated, of {','.join(STAGES)}")
  p.add_argument("--delete", action="store_true", help="delete the TPUs at the end, also after a failure")
  p.add_argument("--logs", default="", help="local directory for the workers' logs (default logs/NAME)")
  p.add_argument("--allow-local-workdir", action="store_true",
                 help="accept a workdir that is not gs:// (a filesystem every host mounts)")
  p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
  return p


class Plan:
  """The gcloud commands for one TPU VM or queued resource."""

  def __init__(self, args, topo):
    self.args, self.topo = args, topo
    self.queued = args.queued or topo.slices > 1
    self.runtime = args.runtime_version or topo.generation.runtime_version

  def _common(self):
    flags = [f"--zone={self.args.zone}"]
    return flags + ([f"--project={self.args.project}"] if self.args.project else [])

  def _capacity(self):
    return ["--spot"] if self.args.spot else ["--reserved"] if self.args.reserved else []

  def create(self):
    a = self.args
    if not self.queued:
      return ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *self._common(),
              f"--accelerator-type={self.topo.accelerator_type}", f"--version={self.runtime}", *self._capacity()]
    nodes = ([f"--node-count={self.topo.slices}", f"--node-prefix={a.name}"] if self.topo.slices > 1
             else [f"--node-id={a.name}"])
    return ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *self._common(),
            f"--accelerator-type={self.topo.accelerator_type}", f"--runtime-version={self.runtime}", *nodes,
            *self._capacity()]

  def state(self):
    """Prints the queued resource's state (ACTIVE once every node is up)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.name, *self._common(),
            "--format=value(state.state)"]

  def _workers(self, verb):
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", verb, *self._common(), "--node=all", "--worker=all"]
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *self._common(), "--worker=all"]

  def ssh(self, command):
    return [*self._workers("ssh"), self.args.name, f"--command={command}"]

  def scp(self, *paths):
    return [*self._workers("scp"), *paths]

  def delete(self):
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.args.name, *self._common(),
              "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.args.name, *self._common(), "--quiet"]


def tarball_command(tarball):
  """Packs the checkout as git sees it (tracked + untracked, without ignored files)."""
  return (f"cd {shlex.quote(common.REPO)} && git ls-files -co --exclude-standard -z | "
          f"tar czf {shlex.quote(tarball)} --null -T -")


def install_command():
  """On every worker: unpack, then a Python 3.11 venv with vidsim[tpu] (TPU VM images ship older Pythons)."""
  return (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/vidsim.tar.gz -C {REMOTE_DIR} && "
          "python3 -m pip install --quiet --user uv && "
          f"~/.local/bin/uv venv --quiet --allow-existing --python 3.11 {REMOTE_VENV} && "
          f"~/.local/bin/uv pip install --quiet --python {REMOTE_VENV}/bin/python \"$HOME/vidsim[tpu]\"")


def run_command(name, vidsim_args):
  """On every worker, the same line: vidsim, its output kept in a log and streamed with the host name."""
  log = f"~/{REMOTE_LOGS}/{name}-$(hostname).log"
  vidsim = f"{REMOTE_VENV}/bin/python -m vidsim {shlex.join(vidsim_args)}"
  return (f"mkdir -p ~/{REMOTE_LOGS} && cd {REMOTE_DIR} && {vidsim} 2>&1 | tee -a {log} | "
          "sed -u \"s/^/[$(hostname)] /\"; exit ${PIPESTATUS[0]}")


def steps(plan, stages, vidsim_args, logs):
  """(stage, description, command) in order; a command is an argv list or a shell line."""
  name = plan.args.name
  tarball = f"/tmp/vidsim-{name}.tar.gz"
  out = []
  if "create" in stages:
    out.append(("create", "create the TPUs", plan.create()))
    if plan.queued:
      out.append(("create", f"wait until ACTIVE (every {POLL_S} s)", plan.state()))
  if "install" in stages:
    out.append(("install", "pack this checkout", tarball_command(tarball)))
    out.append(("install", "copy it to every worker", plan.scp(tarball, f"{name}:vidsim.tar.gz")))
    out.append(("install", "install vidsim on every worker", plan.ssh(install_command())))
  if "run" in stages:
    out.append(("run", "run on every worker", plan.ssh(run_command(name, vidsim_args))))
  if "logs" in stages:
    out.append(("logs", f"collect the logs into {logs}", plan.scp("--recurse", f"{name}:{REMOTE_LOGS}", logs)))
  if "delete" in stages:
    out.append(("delete", "delete the TPUs", plan.delete()))
  return out


def show(command):
  return command if isinstance(command, str) else shlex.join(command)


def wait_active(command):
  while True:
    state = subprocess.run(command, capture_output=True, text=True).stdout.strip()
    _say(f"queued resource: {state or '(no state)'}")
    if state == "ACTIVE":
      return 0
    if state in ("FAILED", "SUSPENDED", ""):
      return 1
    time.sleep(POLL_S)


def execute(step_list):
  code, run_code = 0, None
  for stage, description, command in step_list:
    if code and stage != "delete":
      continue  # After a failure only the requested delete still runs.
    _say(f"{stage}: {description}: {show(command)}")
    if "wait until ACTIVE" in description:
      result = wait_active(command)
    elif stage == "logs":
      os.makedirs(command[-1], exist_ok=True)
      result = subprocess.call(command)
    else:
      result = subprocess.call(command, shell=isinstance(command, str))
    if stage == "run":
      run_code = result
    if result and not code:
      _say(f"{stage} failed with exit code {result}")
      code = result
  return run_code if run_code is not None else code


def _say(message):
  print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv):
  launcher_args, command = common.split_command(argv)
  parser = build_parser()
  args = parser.parse_args(launcher_args)
  try:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
      raise common.LaunchUsage(f"--stages {args.stages!r}: unknown {unknown}; valid: {','.join(STAGES)}")
    if args.delete and "delete" not in stages:
      stages.append("delete")
    topo = common.topology(args.accelerator, args.slices)
    vidsim_args = []
    if "run" in stages:
      vidsim_args = common.with_dcn(common.vidsim_command(command), topo.slices)
      workdir = common.option(vidsim_args, "--workdir")
      if topo.total_hosts > 1 and workdir and not workdir.startswith("gs://") and not args.allow_local_workdir:
        raise common.LaunchUsage(f"--workdir {workdir}: {topo.total_hosts} hosts must share the workdir; use "
                                 "gs://BUCKET/... (or --allow-local-workdir for a filesystem every host mounts)")
    elif command:
      common.vidsim_command(command)
  except common.LaunchUsage as e:
    return common.fail_usage(parser, str(e))
  plan = Plan(args, topo)
  step_list = steps(plan, stages, vidsim_args, args.logs or os.path.join("logs", args.name))
  if args.dry_run:
    print(f"# {topo.accelerator_type} x {topo.slices} slice(s): {topo.hosts} hosts x {topo.chips_per_host} chips "
          f"per slice, {topo.total_hosts} workers, runtime {plan.runtime}")
    for stage, description, cmd in step_list:
      print(f"# {stage}: {description}")
      print(show(cmd))
    return 0
  return execute(step_list)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
