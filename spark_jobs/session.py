"""The SparkSession every job uses: Delta enabled, one Python thread per task.

Delta's jars come from Maven Central through spark.jars.packages, cached in an Ivy directory we
control. Under `spark-submit` the JVM is already running when Python starts, so the same settings
are also written to pyspark's spark-defaults.conf by `python -m spark_jobs.session --write-defaults`
(the install step does it); `delta_available()` tells a job whether they took effect.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, Optional

DELTA_VERSION = "4.0.1"  # must match pyspark 4.0.x
DELTA_PACKAGE = f"io.delta:delta-spark_2.13:{DELTA_VERSION}"
# s3a:// for Spark: hadoop-aws must match the Hadoop inside pyspark 4.0.x (hadoop-client-api 3.4.1); it brings
# the AWS SDK v2 bundle (~560 MB, fetched once by the install step)
HADOOP_AWS_VERSION = "3.4.1"
HADOOP_AWS_PACKAGE = f"org.apache.hadoop:hadoop-aws:{HADOOP_AWS_VERSION}"
# The AWS SDK logs through a bundled slf4j 1.7 that prints a 3-line "no binding" notice on every JVM start;
# slf4j-nop 1.7 is that binding (the SDK's log lines were discarded anyway)
SLF4J_NOP_PACKAGE = "org.slf4j:slf4j-nop:1.7.36"
PACKAGES = (DELTA_PACKAGE, HADOOP_AWS_PACKAGE, SLF4J_NOP_PACKAGE)
IVY_DIR = os.environ.get("FACEAGE_IVY", str(Path.home() / ".cache" / "faceage" / "ivy"))


LOG4J2 = Path(__file__).with_name("log4j2.properties")
JAR_PREFIXES = (f"io.delta_delta-spark_2.13-{DELTA_VERSION}.", f"io.delta_delta-storage-{DELTA_VERSION}.",
                "org.antlr_antlr4-runtime-", f"org.apache.hadoop_hadoop-aws-{HADOOP_AWS_VERSION}.",
                "software.amazon.awssdk_bundle-", "org.wildfly.openssl_wildfly-openssl-", "org.slf4j_slf4j-nop-1.7.36.")


def fetched_jars(ivy_dir: str = IVY_DIR) -> Optional[list]:
    """Delta's and hadoop-aws's jars once Ivy has fetched them (the install step does it once), else None."""
    folder = Path(ivy_dir) / "jars"
    jars = sorted(str(p) for p in folder.glob("*.jar") if p.name.startswith(JAR_PREFIXES)) \
        if folder.is_dir() else []
    found = {prefix for prefix in JAR_PREFIXES for j in jars if Path(j).name.startswith(prefix)}
    return jars if len(found) == len(JAR_PREFIXES) else None


def jar_conf(ivy_dir: str = IVY_DIR) -> Dict[str, str]:
    """The fetched jars by path (no Ivy resolution, nothing printed, no network), or the Maven packages."""
    jars = fetched_jars(ivy_dir)
    if jars:
        return {"spark.jars": ",".join(jars)}
    return {"spark.jars.packages": ",".join(PACKAGES), "spark.jars.ivy": ivy_dir}


def s3a_conf(env=None) -> Dict[str, str]:
    """Hadoop settings for S3 from the environment every AWS SDK reads: an S3-compatible endpoint
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL: a local server, MinIO) is addressed path-style, in the
    region of AWS_REGION / AWS_DEFAULT_REGION. Credentials stay with S3A's default chain (environment,
    instance profile), never in a setting."""
    env = os.environ if env is None else env
    conf = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        conf.update({"fs.s3a.endpoint": endpoint, "fs.s3a.path.style.access": "true",
                     "fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https:")).lower()})
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        conf["fs.s3a.endpoint.region"] = region
    return conf


def configure_s3(spark) -> None:
    """s3a:// as configured by s3a_conf, and s3:// served by S3A where nothing else serves it (EMR's
    EMRFS keeps s3:// on EMR), so a URI means the same object to Spark and to the Python side."""
    hadoop = spark._jsc.hadoopConfiguration()
    endpoint_set = bool(hadoop.get("fs.s3a.endpoint"))  # a --conf spark.hadoop.fs.s3a.endpoint wins
    for key, value in s3a_conf().items():
        if key == "fs.s3a.endpoint.region" and hadoop.get(key):
            continue
        if key != "fs.s3a.endpoint.region" and endpoint_set:
            continue
        hadoop.set(key, value)
    if hadoop.get("fs.s3.impl") is None:
        hadoop.set("fs.s3.impl", "org.apache.hadoop.fs.s3a.S3AFileSystem")


def base_conf(ivy_dir: str = IVY_DIR, python: Optional[str] = None) -> Dict[str, str]:
    """Spark settings shared by every job (and written to spark-defaults.conf)."""
    python = python or sys.executable
    return {
        **jar_conf(ivy_dir),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        # local mode: the driver JVM is the executor too; 1 GiB (Spark's default) is tight for image bytes
        "spark.driver.memory": os.environ.get("FACEAGE_DRIVER_MEMORY", "4g"),
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        # Native libraries in the detector and numpy must not each start a thread per core.
        "spark.executorEnv.OMP_NUM_THREADS": "1",
        "spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        # Spark's catalog folder, made on the first SQL command (e.g. Delta's DESCRIBE HISTORY): not in the
        # user's working directory
        "spark.sql.warehouse.dir": os.environ.get("FACEAGE_WAREHOUSE", str(Path(IVY_DIR).parent / "spark-warehouse")),
    }


# Jobs over photo folders (prepare, score): with Spark's defaults (4 MB "open cost" per file) a task
# holds one photo; with these, ~50 small photos (fewer big ones), so tasks are cheap to start yet short
# enough that 2 cores finish together. Arrow batches stay small (image bytes are big).
PHOTO_JOB_CONF = {
    "spark.sql.files.openCostInBytes": str(256 * 1024),
    "spark.sql.files.maxPartitionBytes": str(16 * 2**20),
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
}


def apply_conf_defaults(spark, conf: Dict[str, str]) -> None:
    """Set session conf values that nobody set (a --conf given to spark-submit wins)."""
    for key, value in conf.items():
        if spark.conf.get(key, None) is None:
            spark.conf.set(key, value)


def get_spark(app_name: str, extra: Optional[Dict[str, str]] = None):
    """getOrCreate a session with base_conf (+ `extra`).

    Started by spark-submit, settings given there (--master, --conf, spark-defaults.conf) win;
    started from plain Python, the master is local[*] (or $FACEAGE_SPARK_MASTER).
    """
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    under_spark_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    given = SparkConf() if under_spark_submit else None  # what spark-submit already set
    builder = SparkSession.builder.appName(app_name)
    if not under_spark_submit:
        builder = builder.master(os.environ.get("FACEAGE_SPARK_MASTER", "local[*]"))
    # Spark's stage progress bar where a person watches (a terminal), not in logs and CI
    progress = {"spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false"}
    for key, value in {**base_conf(), **progress, **(extra or {})}.items():
        if given is None or not given.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    configure_s3(spark)
    spark.sparkContext.setLogLevel(os.environ.get("FACEAGE_SPARK_LOG_LEVEL", "WARN"))
    return spark


def delta_available(spark) -> bool:
    """True when Delta's classes are on the driver's classpath."""
    try:
        # --packages jars live in Spark's context class loader, not the one Class.forName would use
        loader = spark._jvm.java.lang.Thread.currentThread().getContextClassLoader()
        loader.loadClass("io.delta.tables.DeltaTable")
        return True
    except Exception:  # noqa: BLE001 - py4j wraps ClassNotFoundException
        return False


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def write_defaults(path: Optional[Path] = None) -> Path:
    """Write base_conf into pyspark's conf/spark-defaults.conf so plain spark-submit gets Delta, and the
    project's log4j2.properties beside it (quiet consoles). Delta's and hadoop-aws's jars are fetched once here
    (Ivy, from Maven Central) and named by path afterwards, so no job resolves them again."""
    import shutil

    path = path or spark_home() / "conf" / "spark-defaults.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LOG4J2, path.parent / "log4j2.properties")
    if fetched_jars() is None:  # one JVM start to let Ivy fetch them
        spark = get_spark("faceage-install")
        spark.stop()
    lines = ["# written by `python -m spark_jobs.session --write-defaults` (faceage install step)"]
    lines += [f"{k} {v}" for k, v in base_conf().items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-defaults", action="store_true",
                        help="write Delta + Python settings into pyspark's spark-defaults.conf")
    args = parser.parse_args(argv)
    if args.write_defaults:
        print(f"wrote {write_defaults()}")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
