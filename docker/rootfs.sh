#!/usr/bin/env bash
# make image: faceage's runtime image built here without any registry - Debian's packages (mmdebstrap) and the
# locked wheels (pip's cache / PyPI), both from docker/image.txt - as a root filesystem folder, imported into
# podman when podman is there. Run a command inside it with docker/run-in-image.sh.
#   bash docker/rootfs.sh [OUT]        (OUT: build/image; needs root, mmdebstrap, unshare)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/image}
py=${PYTHON:-.venv/bin/python}
marker=.faceage-image
for tool in mmdebstrap unshare chroot; do
  command -v "$tool" >/dev/null || { echo "image: $tool is missing (apt-get install mmdebstrap util-linux)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "image: building a root filesystem needs root (mmdebstrap, chroot)" >&2; exit 2; }
if [ -e "$out" ] && [ ! -e "$out/$marker" ]; then
  echo "image: $out exists and was not made by make image; refusing to replace it (give another folder)" >&2; exit 2
fi
started=$(date +%s)
work="$out.building"
rm -rf "$work"
mkdir -p "$work/wheels"
trap 'rm -rf "$work"' EXIT
debian=$(sed -n 's/^debian: *//p' docker/image.txt | tr ' ' ,)

# 1. the locked wheels, resolved here (the same Python 3.11, x86_64) and installed offline inside
"$py" docker/requirements.py . > "$work/requirements.txt"
"$py" -m pip wheel -q --disable-pip-version-check --prefer-binary -c requirements.lock \
  -r "$work/requirements.txt" -w "$work/wheels"  # pyspark is an sdist on PyPI: built into a wheel here
"$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$work/wheels" .

# 2. Debian's minimal base and the list's packages
mmdebstrap --quiet --variant=minbase --include="$debian" bookworm "$work/root"

# 3. inside it: the venv (install.sh, the Dockerfile's own step), the jars Spark needs, no caches
mkdir -p "$work/root/opt/faceage/src/docker" "$work/root/opt/faceage/ivy"
cp setup.cfg requirements.lock "$work/root/opt/faceage/src/"
cp docker/image.txt docker/install.sh docker/requirements.py "$work/root/opt/faceage/src/docker/"
cp -r "$work/wheels" "$work/root/tmp/wheels"
ivy=$("$py" -c 'from spark_jobs.session import IVY_DIR; print(IVY_DIR)')
[ -d "$ivy/jars" ] || { echo "image: no Spark jars in $ivy/jars (run make install first)" >&2; exit 2; }
cp -r "$ivy/jars" "$work/root/opt/faceage/ivy/jars"
env_line=$(sed -n 's/^env: *//p' docker/image.txt)
wheel=$(basename "$(ls "$work"/wheels/faceage-*.whl)")
# shellcheck disable=SC2086
unshare --mount --pid --fork --mount-proc="$work/root/proc" chroot "$work/root" /usr/bin/env -i HOME=/root $env_line \
  sh /opt/faceage/src/docker/install.sh /opt/faceage/src "/tmp/wheels/$wheel" /tmp/wheels
rm -rf "$work/root/tmp/wheels" "$work/root/root/.cache"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tfaceage-image\n' > "$work/root/etc/hosts"  # run-in-image.sh's host name

# 4. replace the previous image folder (ours: the marker), then podman's image when podman is there
rm -rf "$out"
mv "$work/root" "$out"
touch "$out/$marker"
if command -v podman >/dev/null; then
  tar --numeric-owner -C "$out" -c . | podman import --quiet - faceage-runtime:latest >/dev/null \
    && echo "image: podman image faceage-runtime:latest" || echo "image: podman import failed; the folder stands"
fi
echo "image: $out ($(du -sh "$out" | cut -f1)) in $(( $(date +%s) - started )) s"
