"""launch/gke/render.sh: a vidsim command as a JobSet on GKE TPU slices.

Fills launch/gke/jobset.yaml for an accelerator type and slice count (hosts x chips
per host and the node selectors from vidsim.topology), writes it, and applies it
with kubectl; --dry-run prints the manifest (with the kubectl command and the
equivalent `xpk workload create` as YAML comments) and runs nothing.
"""

import argparse
import json
import os
import shlex
import string
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

PROG = "launch/gke/render.sh"
TEMPLATE = os.path.join(HERE, "jobset.yaml")
COORDINATOR_PORT = 8482  # jax's default coordinator port on TPU.


def build_parser():
  p = argparse.ArgumentParser(
      prog=PROG, usage=f"{PROG} --name NAME --accelerator TYPE --image IMAGE [--slices N] [options] "
      "-- vidsim COMMAND ...", description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True, help="JobSet name (DNS label: lower case, digits, '-')")
  p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64, v5litepod-256, v6e-64")
  p.add_argument("--image", required=True, help="container image with vidsim installed (launch/gke/Dockerfile)")
  p.add_argument("--slices", type=int, default=1, help="TPU slices over DCN (default 1)")
  p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure (default 3)")
  p.add_argument("--grace-s", type=int, default=120, help="terminationGracePeriodSeconds: time to checkpoint on SIGTERM")
  p.add_argument("--out", default="", help="manifest path (default: jobset-NAME.yaml)")
  p.add_argument("--cluster", default="CLUSTER", help="GKE cluster, for the xpk command")
  p.add_argument("--project", default="", help="GCP project, for the xpk command")
  p.add_argument("--zone", default="", help="zone, for the xpk command")
  p.add_argument("--allow-local-workdir", action="store_true",
                 help="accept a workdir that is not gs:// (a filesystem every host mounts)")
  p.add_argument("--dry-run", action="store_true", help="print the manifest and commands, run nothing")
  return p


def container_command(vidsim_args):
  """The pod's shell line: its global process id, then vidsim (the same line in every pod)."""
  # `let`, not $((...)): kubelet rewrites $(NAME) in args. JOB_COMPLETION_INDEX is the
  # pod's index in its (indexed) Job: its host index in the slice.
  return ("let VIDSIM_PROCESS_ID=MEGASCALE_SLICE_ID*HOSTS_PER_SLICE+JOB_COMPLETION_INDEX; export VIDSIM_PROCESS_ID; "
          f"exec {shlex.join(['python3', '-m', 'vidsim', *vidsim_args])}")


def render(name, topo, image, vidsim_args, workdir, max_restarts=3, grace_s=120):
  values = dict(
      NAME=name, ACCELERATOR=topo.accelerator_type, SLICES=topo.slices, HOSTS=topo.hosts,
      CHIPS_PER_HOST=topo.chips_per_host, TOTAL_HOSTS=topo.total_hosts, TOPOLOGY="x".join(map(str, topo.shape)),
      GKE_ACCELERATOR=topo.generation.gke_accelerator, IMAGE=image, WORKDIR=workdir or "(none)",
      MAX_RESTARTS=max_restarts, GRACE_S=grace_s, COORDINATOR_PORT=COORDINATOR_PORT,
      COMMAND=json.dumps(container_command(vidsim_args)),  # A JSON string is a YAML string.
  )
  with open(TEMPLATE) as f:
    return string.Template(f.read()).substitute(values)


def xpk_command(args, topo, vidsim_args):
  cmd = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.name}",
         f"--tpu-type={topo.accelerator_type}", f"--num-slices={topo.slices}", f"--docker-image={args.image}",
         f"--max-restarts={args.max_restarts}"]
  cmd += [f"--project={args.project}"] if args.project else []
  cmd += [f"--zone={args.zone}"] if args.zone else []
  # xpk sets the TPU and MEGASCALE variables itself; jax finds the coordinator from them.
  cmd.append("--command=" + shlex.join(["python3", "-m", "vidsim", *vidsim_args]))
  return shlex.join(cmd)


def main(argv):
  launcher_args, command = common.split_command(argv)
  parser = build_parser()
  args = parser.parse_args(launcher_args)
  try:
    topo = common.topology(args.accelerator, args.slices)
    vidsim_args = common.with_dcn(common.vidsim_command(command), topo.slices)
    workdir = common.option(vidsim_args, "--workdir")
    if topo.total_hosts > 1 and workdir and not workdir.startswith("gs://") and not args.allow_local_workdir:
      raise common.LaunchUsage(f"--workdir {workdir}: {topo.total_hosts} hosts must share the workdir; use gs://BUCKET/... "
                               "(or --allow-local-workdir for a filesystem every host mounts)")
  except common.LaunchUsage as e:
    return common.fail_usage(parser, str(e))
  manifest = render(args.name, topo, args.image, vidsim_args, workdir, args.max_restarts, args.grace_s)
  out = args.out or f"jobset-{args.name}.yaml"
  apply = ["kubectl", "apply", "-f", out]
  if args.dry_run:
    print(f"# {shlex.join(apply)}")
    print(f"# equivalent: {xpk_command(args, topo, vidsim_args)}")
    print(manifest, end="")
    return 0
  with open(out, "w") as f:
    f.write(manifest)
  print(f"{PROG}: wrote {out}; {shlex.join(apply)}", file=sys.stderr)
  return subprocess.call(apply)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
