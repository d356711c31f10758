#!/usr/bin/env bash
# Run a command inside the root filesystem `make image` built, as a container would: its own mount, PID and
# host-name namespaces (host name faceage-image, in its /etc/hosts: the JVM resolves its own name), /proc of its
# own, the image's environment (docker/image.txt's env line), the host's network (loopback included).
#   bash docker/run-in-image.sh ROOT COMMAND [ARGS...]
set -euo pipefail
root=$1
shift
[ -e "$root/.faceage-image" ] || { echo "run-in-image: $root is not an image folder made by make image" >&2; exit 2; }
env_line=$(sed -n 's/^env: *//p' "$(dirname "$0")/image.txt")
# shellcheck disable=SC2086
exec unshare --uts --mount --pid --fork --mount-proc="$root/proc" \
  sh -c 'hostname faceage-image && exec chroot "$@"' sh "$root" /usr/bin/env -i HOME=/root $env_line "$@"
