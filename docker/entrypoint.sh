#!/usr/bin/env bash
# faceage image entrypoint, following Spark-on-Kubernetes' container conventions:
#   driver ARGS...    the driver pod (Spark's k8s submission client starts it with these): spark-submit in
#                     client mode inside the pod, bound to the pod's address
#   executor          an executor pod: Spark's KubernetesExecutorBackend, configured by the SPARK_* variables
#                     the driver sets on the pod (driver URL, executor id, cores, memory, app id, pod IP/name)
#   anything else     run as given (spark-submit ..., faceage-serve ..., bash)
set -euo pipefail

: "${SPARK_HOME:=$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}"
export SPARK_HOME PYSPARK_PYTHON="${PYSPARK_PYTHON:-$(command -v python)}"
# Spark's jars, then the ones the image fetched at build time (Delta, hadoop-aws), then any extra
SPARK_CLASSPATH="${SPARK_HOME}/jars/*:${FACEAGE_IVY:-$HOME/.cache/faceage/ivy}/jars/*${SPARK_EXTRA_CLASSPATH:+:$SPARK_EXTRA_CLASSPATH}"

case "${1:-}" in
  driver)
    shift
    exec "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    for var in SPARK_DRIVER_URL SPARK_EXECUTOR_ID SPARK_EXECUTOR_CORES SPARK_EXECUTOR_MEMORY \
               SPARK_APPLICATION_ID SPARK_EXECUTOR_POD_IP; do
      if [ -z "${!var:-}" ]; then
        echo "entrypoint: executor: $var is not set (Spark's driver sets it on executor pods)" >&2
        exit 2
      fi
    done
    # SPARK_JAVA_OPT_0, _1, ...: the executor's JVM options, in their numeric order
    mapfile -t java_opts < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')
    exec "${JAVA_HOME:-/usr}/bin/java" "${java_opts[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "${SPARK_CLASSPATH}" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" \
      --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
      --podName "${SPARK_EXECUTOR_POD_NAME:-$(hostname)}"
    ;;
  "")
    exec spark-submit spark_jobs/prepare.py --help
    ;;
  *)
    exec "$@"
    ;;
esac
