"""Benchmark: spark_jobs/evaluate.py on N synthetic prediction rows (default 10 million), with the time and
the peak memory of the driver (spark-submit's JVM + the Python driver, sampled every 0.2 s).

Synthetic rows: a faces-table-shaped labels table (face_id, age, gender, race, dataset, split) and a
predictions table (face_id, predicted_age = age + noise, status ok), both Parquet, written by Spark itself.

    python -m bench.evaluate_bench --rows 10000000 --work /tmp/faceage-eval-bench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from schemas import layout
from bench.common import REPO  # noqa: E402


def generate(rows: int, work: Path) -> None:
    from pyspark.sql import functions as sf

    from schemas import fields as schema_fields
    from schemas.tables import PREDICTIONS
    from spark_jobs.session import get_spark

    spark = get_spark("faceage-eval-bench-data")
    ids = spark.range(rows, numPartitions=16)
    labels = ids.select(sf.concat(sf.lit("f"), sf.col("id").cast("string")).alias("face_id"),
                        ((sf.col("id") * 7919) % 100).cast("int").alias("age"),
                        (sf.col("id") % 2).cast("int").alias("gender"), (sf.col("id") % 5).cast("int").alias("race"),
                        sf.lit("synthetic").alias("dataset"), sf.lit("test").alias("split"))
    labels.write.mode("overwrite").parquet(str(work / "labels" / "faces"))
    by_name = {f.name: f for f in PREDICTIONS}
    values = {"face_id": sf.concat(sf.lit("f"), sf.col("id").cast("string")),
              "source_path": sf.concat(sf.lit("file:/photos/"), sf.col("id").cast("string"), sf.lit(".jpg")),
              "face_index": sf.lit(0),
              "predicted_age": ((sf.col("id") * 7919) % 100) + sf.randn(7) * 6.0,
              "uncertainty": sf.rand(3) * 5, "status": sf.lit("ok"), "model_id": sf.lit("bench"),
              "score_run_id": sf.lit("bench")}
    preds = ids.select(*[(values[n] if n in values else sf.lit(None)).cast(
        schema_fields.spark_schema([by_name[n]])[0].dataType).alias(n) for n in by_name])
    preds.write.mode("overwrite").parquet(str(work / "scored" / layout.PREDICTIONS_DIR))
    spark.stop()


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True))
    except psutil.NoSuchProcess:
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--work", default="/tmp/faceage-eval-bench")
    p.add_argument("--reuse", action="store_true", help="keep the generated tables from a previous run")
    args = p.parse_args()
    work = Path(args.work)
    t = time.time()
    if not args.reuse:
        generate(args.rows, work)
    generate_s = time.time() - t
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    start = time.time()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
                             str(REPO / "spark_jobs" / "evaluate.py"), "--predictions", str(work / "scored"),
                             "--labels", str(work / "labels"), "--output", str(work / "report")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.time() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(err[-3000:])
    metrics = json.loads((work / "report" / layout.EVAL_METRICS).read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "rows": args.rows, "matched": metrics["rows"]["matched"], "generate_seconds": round(generate_s, 1),
        "evaluate_seconds_end_to_end": round(seconds, 1), "evaluate_seconds_job": metrics["seconds"],
        "peak_driver_rss_mib": round(peak[0] / 2**20), "spark_driver_memory": "4g (spark_jobs/session.py)",
        "overall": metrics["overall"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
