#!/usr/bin/env bash
# Start a throwaway S3-compatible server (moto's server mode, from the dev pins) on loopback for the S3 tests.
#
#   source .ci/s3.sh          # starts it, exports FACEAGE_TEST_S3=http://127.0.0.1:$PORT
#   .ci/s3.sh stop            # stops it
#
# Nothing leaves the machine: the server keeps its buckets in memory and dies with its process.
S3_PORT=${FACEAGE_S3_PORT:-55433}
S3_DIR=${FACEAGE_S3_DIR:-/tmp/faceage-s3}
_S3_PY=${FACEAGE_S3_PYTHON:-.venv/bin/python}

_s3_stop() {
  if [ -f "$S3_DIR/pid" ]; then kill "$(cat "$S3_DIR/pid")" 2>/dev/null || true; rm -f "$S3_DIR/pid"; fi
}

_s3_start() {
  mkdir -p "$S3_DIR"
  _s3_stop
  "$_S3_PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$S3_DIR/log" 2>&1 &
  echo $! >"$S3_DIR/pid"
  local i
  for i in $(seq 1 50); do
    if "$_S3_PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$S3_PORT/moto-api/')" 2>/dev/null; then
      export FACEAGE_TEST_S3="http://127.0.0.1:$S3_PORT"
      echo "s3: moto server on $FACEAGE_TEST_S3 (pid $(cat "$S3_DIR/pid"))"
      return 0
    fi
    sleep 0.2
  done
  echo "s3: the moto server did not start; its log:" >&2; cat "$S3_DIR/log" >&2; return 1
}

if [ "${1:-start}" = stop ]; then _s3_stop; else _s3_start; fi
