#!/bin/bash
# EMR bootstrap action (every node, before applications start): the project's pinned Python stack in
# /opt/faceage/venv. Argument: the s3:// prefix the code bundle was uploaded to (python -m spark_jobs.emr).
# Target release: emr-spark-8.0.0 (Spark 4.0.2, Python 3.11+, JDK 17).
set -euo pipefail
CODE=${1:?usage: emr_bootstrap.sh s3://bucket/prefix}
PY=$(command -v python3.11 || command -v python3.12 || command -v python3)
sudo mkdir -p /opt/faceage && sudo chown "$(id -u):$(id -g)" /opt/faceage
aws s3 cp "$CODE/requirements.lock" /opt/faceage/requirements.lock
"$PY" -m venv /opt/faceage/venv
/opt/faceage/venv/bin/pip install -q --upgrade pip
# Everything pinned; pyspark itself comes from EMR (its Spark), so it is left out. petastorm declares
# setuptools<70 while torch needs >=77: it goes in with --no-deps after its runtime dependencies.
# torch: the CUDA build (PyPI's default, with its nvidia-* wheels) only where the node has an NVIDIA GPU; the CPU
# build (PyTorch's CPU index, ~200 MB instead of ~2.7 GB) everywhere else. Test tools (pytest, moto) stay out.
LOCK=/opt/faceage/requirements.lock
TORCH=$(grep -E '^torch==' "$LOCK"); VISION=$(grep -E '^torchvision==' "$LOCK")
grep -v -E '^(pyspark|delta-spark|py4j|torch|torchvision|triton|nvidia-[a-z0-9-]+|pytest|moto|pluggy|iniconfig)==' \
  "$LOCK" > /opt/faceage/requirements.emr.txt
if command -v nvidia-smi >/dev/null 2>&1 || lspci 2>/dev/null | grep -qi nvidia; then
  /opt/faceage/venv/bin/pip install -q "$TORCH" "$VISION"
else
  /opt/faceage/venv/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu "$TORCH" "$VISION"
fi
/opt/faceage/venv/bin/pip install -q -r /opt/faceage/requirements.emr.txt
/opt/faceage/venv/bin/pip install -q --no-deps petastorm==0.13.1
# EMR's own pyspark on the venv's path (same Spark that runs the jobs)
SITE=$(/opt/faceage/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "/usr/lib/spark/python" > "$SITE/emr-spark.pth"
ls /usr/lib/spark/python/lib/py4j-*-src.zip 2>/dev/null | head -1 >> "$SITE/emr-spark.pth" || true
