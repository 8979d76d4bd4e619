#!/usr/bin/env bash
# Train on every GPU of this machine (or N CPU processes with gloo): scripts/torchrun_local.sh N histo-args...
#   scripts/torchrun_local.sh 4 train --tiles tiles.zarr --out kimianet.pt
#   scripts/torchrun_local.sh 2 segment train --data brats/ --out unet.pt --device cpu
set -euo pipefail
nproc=${1:?number of processes}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" -m histo.cli "$@"
