#!/bin/sh
# Run INSIDE the image being built (docker build, or docker/rootfs.sh's chroot): the runtime's Python
# packages into /opt/faceage/venv, from the pins (requirements.lock) less docker/image.txt's leave-out list,
# then faceage itself, then Spark's defaults (the jars in $FACEAGE_IVY/jars, named by path).
#   sh docker/install.sh SOURCE_TREE PROJECT [WHEEL_DIR]
# PROJECT: what pip installs as faceage (the source tree, or its wheel); WHEEL_DIR: install offline from there.
# TORCH_INDEX=URL (a CPU wheel index such as PyTorch's): the left-out training packages too, torch from there
# (a training image; without it the image holds no torch and runs ONNX exports).
set -eu
src=$1 project=$2 wheels=${3:-}
training=${TORCH_INDEX:+yes}
venv=/opt/faceage/venv
offline=""
[ -n "$wheels" ] && offline="--no-index --find-links $wheels"
python3 -m venv "$venv"
"$venv/bin/python" "$src/docker/requirements.py" "$src" ${training:+--training} > /tmp/faceage-runtime.txt
if [ -n "${training:-}" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check --index-url "$TORCH_INDEX" \
    $(grep -E '^torch(vision)?==' "$src/requirements.lock")
fi
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --disable-pip-version-check $offline -c "$src/requirements.lock" -r /tmp/faceage-runtime.txt
# petastorm declares setuptools<70 (torch needs >=77): its runtime deps come from setup.cfg, it comes without
[ -z "${training:-}" ] || "$venv/bin/pip" install -q --disable-pip-version-check --no-deps petastorm==0.13.1
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --disable-pip-version-check $offline --no-deps "$project"
rm -f /tmp/faceage-runtime.txt
FACEAGE_IVY=${FACEAGE_IVY:-/opt/faceage/ivy} "$venv/bin/python" -m spark_jobs.session --write-defaults
