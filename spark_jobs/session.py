"""The SparkSession every job uses: Delta enabled, one Python thread per task, a bounded start.

Delta's and hadoop-aws's jars come from Maven Central once (the install step, through Ivy, into a cache
we control) and are then put on the driver's and executors' JVM class path by path. They are NOT given as
`spark.jars`: Spark copies every `spark.jars` entry from the driver's file server into a per-job folder at
each start, even in local mode (560 MB a job with the AWS SDK bundle; on a busy machine the copy outlived
the network timeout and the job died at start). Under `spark-submit` the JVM is already running when
Python starts, so the same settings are also written to pyspark's spark-defaults.conf by
`python -m spark_jobs.session --write-defaults`; `delta_available()` tells a job whether they took effect.

`get_spark` bounds the start (FACEAGE_SPARK_START_TIMEOUT seconds), retries once, visibly, a start that
failed only because driver and executor did not reach each other in time, and turns every other start
failure into one line with exit code 3 (`SparkStartError`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

from shell.errors import UserError

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
    """The fetched jars on the driver's and executors' class path (nothing copied per job, no Ivy, no
    network), or the Maven packages before they were fetched. A cluster whose nodes lack these paths gets
    the jars its own way (EMR's Delta, the image's Ivy folder, or --packages): see README "Run on a cluster"."""
    jars = fetched_jars(ivy_dir)
    if jars:
        class_path = os.pathsep.join(jars)
        return {"spark.driver.extraClassPath": class_path, "spark.executor.extraClassPath": class_path}
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


# S3A's retries bounded (unless a --conf spark.hadoop.<key> says otherwise): a storage service that went away
# ends the job in about a minute (each call: 2 SDK attempts x 3 S3A retries from 0.5 s), not in 9 (the
# defaults: 5 attempts x 7 retries, exponential); throttling keeps its own, longer policy.
S3A_BOUNDS = {"fs.s3a.attempts.maximum": "2", "fs.s3a.retry.limit": "3", "fs.s3a.retry.interval": "500ms",
              "fs.s3a.connection.establish.timeout": "10s", "fs.s3a.connection.timeout": "60s"}


def configure_s3(spark) -> None:
    """s3a:// as configured by s3a_conf, and s3:// served by S3A where nothing else serves it (EMR's
    EMRFS keeps s3:// on EMR), so a URI means the same object to Spark and to the Python side."""
    hadoop = spark._jsc.hadoopConfiguration()
    given = spark.sparkContext.getConf()
    for key, value in S3A_BOUNDS.items():
        if not given.contains("spark.hadoop." + key):
            hadoop.set(key, value)
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


# Spark itself could not start (not the user's input): its own exit code, so a scheduler can tell them apart
START_EXIT = 3
START_TIMEOUT_S = float(os.environ.get("FACEAGE_SPARK_START_TIMEOUT", "300"))
# The local executor's first heartbeat comes 1-2 intervals after it starts; when it reaches the driver before
# the driver's block manager registered (a starved CPU), Spark asks it to re-register with a null id and
# logs a NullPointerException. In local mode the heartbeat carries only metrics, so it can wait longer.
LOCAL_HEARTBEAT = "30s"


class SparkStartError(UserError):
    """Spark's JVM or context did not start; the message names the cause and what to try."""
    exit_code = START_EXIT


# (pattern in the error's text, the cause, what to try, retry once?)
_START_FAILURES = (
    (r"BindException|Address already in use|could not bind|Cannot assign requested address",
     "a network port Spark needs is taken or not allowed on this host",
     "free it, or leave spark.driver.port / spark.blockManager.port unset (Spark then picks free ports); "
     "set SPARK_LOCAL_IP=127.0.0.1 when the host name does not resolve", False),
    (r"OutOfMemoryError|Could not reserve enough space|Cannot allocate memory|Invalid maximum heap size",
     "the JVM could not get its memory", "lower FACEAGE_DRIVER_MEMORY (now "
     f"{os.environ.get('FACEAGE_DRIVER_MEMORY', '4g')}) or spark.driver.memory to fit this machine", False),
    (r"IllegalArgumentException|SparkIllegalArgumentException|must be (?:greater|less|no less)",
     "Spark refused a setting", "fix or drop the --conf value named here", False),
    (r"ClosedChannelException|TimeoutException|Futures timed out|RpcTimeout|heartbeat|Connection refused|"
     r"Connection reset|idWithoutTopologyInfo|BlockManagerId",
     "Spark's driver and executor did not reach each other in time (a busy or slow machine)",
     "run it again when the machine is less busy, or raise spark.network.timeout", True),
    (r"Java gateway process exited|JAVA_GATEWAY_EXITED|Could not find or load main class|java: not found",
     "the Java process exited before Spark started",
     "check Java 17 (`java -version`) and `make install`; FACEAGE_LOG_LEVEL=debug shows the JVM's output", False),
)


def _error_text(e: BaseException) -> str:
    """The error and its causes, one line each joined by ' | ' (a Java exception's stack frames left out)."""
    java = getattr(e, "java_exception", None)
    parts = []
    try:
        while java is not None and len(parts) < 6:
            parts.append(str(java.toString()))
            java = java.getCause()
    except Exception:  # noqa: BLE001 - a dead gateway: the Python text below is all there is
        pass
    if not parts:
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("at ")]
        parts = lines[:3] or [type(e).__name__]
    return " | ".join(parts)


def classify_start_failure(e: BaseException):
    """(one-line message, retry?) for an exception raised while starting Spark."""
    text = _error_text(e)
    for pattern, cause, advice, retry in _START_FAILURES:
        if re.search(pattern, text):
            return f"Spark could not start: {cause} ({_shorten(text)}); {advice}", retry
    return f"Spark could not start: {_shorten(text)}", False


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _start_deadline(stage: str, seconds: float) -> threading.Timer:
    """A timer that ends the process with one line if the start outlives `seconds` (py4j's gateway
    launch and the SparkContext constructor have no bound of their own)."""
    def give_up():
        sys.stderr.write(f"{stage}: error: Spark did not start within {seconds:g} s (waited for the JVM, "
                         f"the SparkContext and its executor); the machine may be overloaded: run it again "
                         f"later, or raise FACEAGE_SPARK_START_TIMEOUT\n")
        sys.stderr.flush()
        os._exit(START_EXIT)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def _jvm_stderr_to_buffer():
    """Point the JVM's System.err at an in-memory buffer for the start, and return the stream to put back.
    A start that fails can fail again in Spark's own teardown (after an RPC timeout, Executor.stop ran before
    SparkEnv existed: "Exception in thread dispatcher-event-loop-0 ... ExceptionInInitializerError"), and the
    JVM prints such a thread's trace on System.err, past log4j. Spark's log lines are unaffected (log4j's
    console appender holds the stream it was configured with). Only a JVM already running (spark-submit's):
    from plain Python, getOrCreate launches it with the session's settings (heap, class path); None then."""
    from pyspark import SparkContext

    jvm = SparkContext._jvm
    if jvm is None:
        return None
    original = jvm.java.lang.System.err
    jvm.java.lang.System.setErr(jvm.java.io.PrintStream(jvm.java.io.ByteArrayOutputStream(), True))
    return original


def _start(builder, stage: str):
    """builder.getOrCreate() within START_TIMEOUT_S, retried once (visibly) when the failure is a slow
    start; SparkStartError otherwise. The JVM's stderr is held back until a start succeeds."""
    from shell.cli import log

    from pyspark import SparkContext

    original_err = _jvm_stderr_to_buffer()  # once: a retry must not take the buffer for the console
    for attempt in (1, 2):
        timer = _start_deadline(stage, START_TIMEOUT_S)
        try:
            spark = builder.getOrCreate()
            if original_err is not None:
                SparkContext._jvm.java.lang.System.setErr(original_err)
            return spark
        except Exception as e:  # noqa: BLE001 - py4j, PySpark and JVM errors alike: classified below
            message, retry = classify_start_failure(e)
            if not (retry and attempt == 1):
                raise SparkStartError(message) from None
            log.warning(f"{stage}: {message.split(';')[0]}; retrying once")
        finally:
            timer.cancel()


def submitted_conf():
    """What spark-submit set (--master, --conf, spark-defaults.conf), read from its running JVM; None when
    this process was not started by spark-submit. (A SparkConf made before PySpark connected to that JVM is
    empty: it would make every setting here override the user's.)"""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM; starts no context
    return SparkConf()


def configured_master(given=None) -> str:
    """The master a session started now would use: spark-submit's --master (from `given`, else read here),
    else $FACEAGE_SPARK_MASTER or local[*]."""
    given = given if given is not None else submitted_conf()
    if given is not None:
        return given.get("spark.master", "local[*]")
    return os.environ.get("FACEAGE_SPARK_MASTER", "local[*]")


def get_spark(app_name: str, extra: Optional[Dict[str, str]] = None):
    """getOrCreate a session with base_conf (+ `extra`).

    Started by spark-submit, settings given there (--master, --conf, spark-defaults.conf) win;
    started from plain Python, the master is local[*] (or $FACEAGE_SPARK_MASTER). A start that fails is
    SparkStartError (one line, exit code 3), after one retry when the machine was only slow.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    given = submitted_conf()  # what spark-submit already set, or None
    builder = SparkSession.builder.appName(app_name)
    master = configured_master(given)
    if given is None:
        builder = builder.master(master)
    # Spark's stage progress bar where a person watches (a terminal), not in logs and CI
    settings = {**base_conf(), "spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false"}
    if master.startswith("local"):
        settings["spark.executor.heartbeatInterval"] = LOCAL_HEARTBEAT
    for key, value in {**settings, **(extra or {})}.items():
        if given is None or not given.contains(key):
            builder = builder.config(key, value)
    spark = _start(builder, app_name.removeprefix("faceage-"))
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
