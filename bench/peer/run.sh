#!/usr/bin/env bash
# ft side by side with finetrainers v0.2.0 (its own code, its precomputation) on the same CogVideoX, clips and steps,
# on a CPU. Usage, from anywhere:
#   bench/peer/run.sh WORKDIR FINETRAINERS_GIT_DIR [compare.py flags...]
# WORKDIR: an empty scratch folder (about 3 GB); FINETRAINERS_GIT_DIR: a git clone or bare mirror of
# a-r-r-o-w/finetrainers holding the tag v0.2.0. The project checkout compared
# is the one this script is run from (its git top level). The first run builds both virtual environments, the tiny
# and medium models and the clips (setup_peer.sh); later runs reuse them. Examples:
#   run.sh SCRATCH $MIRROR --scale medium --reps 3 --steps 30 --configs ft,peer_pre --no-second
#   run.sh SCRATCH $MIRROR --scale tiny --reps 3 --steps 60 --configs ft,peer_pre
# Each repetition runs every configuration once, interleaved, as fresh processes; compare.py prints the table
# (per-step time, CPU per step, peak RSS, encoder calls) and writes results.json. profstep.py profiles two steps
# of either side under torch.profiler (see its docstring). Timings on a shared machine are noisy: read the paired
# ratios, and rerun when the load average was high.
set -euo pipefail
W=$(realpath -m "$1"); MIRROR=$(realpath "$2"); shift 2
PROJECT=$(git rev-parse --show-toplevel)
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W/scripts"
for f in "$HERE"/*.py "$HERE"/*.sh "$HERE"/*.patch; do
  sed -e "s#PEER_ROOT#$W#g" -e "s#PROJECT_CHECKOUT#$PROJECT#g" -e "s#FINETRAINERS_MIRROR#$MIRROR#g" \
      -e "s#LOCAL_WHEELS#the pip configuration's wheels#g" "$f" > "$W/scripts/$(basename "$f")"
done
chmod +x "$W/scripts"/*.sh
[ -f "$W/.setup-done" ] || { bash "$W/scripts/setup_peer.sh" && touch "$W/.setup-done"; }
# the ft side runs the project as committed at the time of setup; refresh it to the current checkout
git -C "$W/ft" fetch -q "$PROJECT" HEAD && git -C "$W/ft" checkout -q --detach FETCH_HEAD
cd "$W" && HF_HUB_OFFLINE=1 "$W/ft/.venv/bin/python" scripts/compare.py "$@"
