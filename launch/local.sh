#!/usr/bin/env bash
# N vidsim processes on this machine (coordinator on 127.0.0.1, gloo CPU collectives,
# K fake CPU devices each): the same code path as a pod. See docs/launch.md.
#   launch/local.sh 2 --devices-per-process 4 -- vidsim train --config F --workdir W
# $PYTHON picks the interpreter (default: python3); it must have vidsim's dependencies.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/local.py" "$@"
