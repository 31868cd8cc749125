#!/usr/bin/env bash
# A vidsim command on every worker of Cloud TPU VMs: create (TPU VM or queued
# resource), install this checkout, run on all workers, collect logs, delete on request.
# --dry-run prints the gcloud commands. See docs/launch.md.
#   launch/tpu_vm.sh --name run1 --zone us-east5-a --accelerator v5p-64 --spot --delete \
#     -- vidsim train --config experiments/digits_demo.py --workdir gs://BUCKET/run1
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/tpu_vm.py" "$@"
