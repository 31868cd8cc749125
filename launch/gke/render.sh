#!/usr/bin/env bash
# A vidsim command as a JobSet on GKE TPU slices (launch/gke/jobset.yaml), applied with
# kubectl; --dry-run prints the manifest and the equivalent xpk command. See docs/launch.md.
#   launch/gke/render.sh --name run1 --accelerator v5p-64 --slices 2 --image IMAGE \
#     -- vidsim train --config experiments/digits_demo.py --workdir gs://BUCKET/run1
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/render.py" "$@"
