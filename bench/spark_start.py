"""Benchmark: a Spark job's fixed start, and what a standalone cluster costs, measured in one run.

1. Fixed start: `spark-submit spark_jobs/prepare.py` of 4 generated chips (--detector none), end to end, median
   of --runs, with the jars given as `spark.jars` (how the install set them up before: Spark copies each into a
   per-job folder, 560 MB) and on the class path (now), alternating; idle, then with every core kept busy by
   CPU hogs (the jobs at normal priority; the hogs stop when the runs do).
2. --cluster-photos N: a prepare of N photos (bench.prepare_bench's composites or any folder) in local mode vs
   on a standalone master with two 1-core workers started here (spark_jobs.local_cluster), alternating.

    python -m bench.spark_start --runs 5
    python -m bench.spark_start --runs 0 --cluster-photos /tmp/faceage-bench/composites-2000-0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schemas import layout
from bench.common import REPO  # noqa: E402


def spark_submit() -> str:
    return os.path.join(os.path.dirname(sys.executable), "spark-submit")


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def properties(folder: Path) -> dict:
    """{variant: properties file}: the installed defaults, and the same with the jars as spark.jars."""
    from spark_jobs import session

    folder.mkdir(parents=True, exist_ok=True)
    lines = (session.spark_home() / "conf" / "spark-defaults.conf").read_text().splitlines()
    jars = session.fetched_jars()
    if jars is None:
        raise SystemExit("spark_start: the jars are not fetched (run make install)")
    now = folder / "class-path.conf"
    now.write_text("\n".join(lines) + "\n")
    before = folder / "jars-copied.conf"
    before.write_text("\n".join(line for line in lines if "extraClassPath" not in line)
                      + f"\nspark.jars {','.join(jars)}\n")
    return {"jars-copied": before, "class-path": now}


def four_chips(folder: Path) -> Path:
    import numpy as np

    from photos.synthetic import draw_face, jpeg_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for i, age in enumerate((20, 30, 40, 50)):
        (folder / f"{age}_0_0_2026010100{i:05d}.jpg").write_bytes(jpeg_bytes(draw_face(age, np.random.default_rng(i),
                                                                                       96)))
    return folder


def prepare_once(props: Path, photos: Path, out: Path, extra=()) -> dict:
    cmd = [spark_submit(), "--properties-file", str(props), *extra, os.path.join(REPO, "spark_jobs", "prepare.py"),
           "--input", str(photos), "--output", str(out), "--quiet"]
    if len(list(photos.iterdir())) <= 8:
        cmd += ["--detector", "none"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"spark_start: prepare failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    timings = json.loads((out / layout.LATEST_MANIFEST).read_text())["timings_s"]
    return {"wall_s": round(wall, 2), "job_s": timings["total"], "spark_start_s": timings["spark_start"]}


def fixed_start(work: Path, runs: int, busy: bool) -> dict:
    props, photos = properties(work), four_chips(work / "four")
    hogs = []
    if busy:
        code = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"
        hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    results = {name: [] for name in props}
    try:
        for i in range(runs):
            for name, path in props.items():  # alternating: drift in the machine's load hits both alike
                results[name].append(prepare_once(path, photos, work / f"out-{name}-{i}"))
                print(f"  {'busy' if busy else 'idle'} {name} run {i + 1}: {results[name][-1]}", flush=True)
    finally:
        for h in hogs:
            h.kill()
    return {name: {"median_wall_s": statistics.median(r["wall_s"] for r in rows),
                   "median_job_s": statistics.median(r["job_s"] for r in rows),
                   "median_spark_start_s": statistics.median(r["spark_start_s"] for r in rows), "runs": rows}
            for name, rows in results.items()}


def cluster_vs_local(work: Path, photos: Path, repeats: int) -> dict:
    from spark_jobs.local_cluster import Cluster

    props = properties(work)["class-path"]
    zip_path = work / "dist"
    subprocess.run([sys.executable, "-m", "spark_jobs.emr", "build", "--dist", str(zip_path)], env=env(), check=True,
                   capture_output=True)
    rows = {"local[2]": [], "standalone 2x1 core": []}
    with Cluster(work / "cluster", workers=2, cores=1, memory="3g") as cluster:
        for i in range(repeats):
            rows["local[2]"].append(prepare_once(props, photos, work / f"local-{i}", ["--master", "local[2]"]))
            rows["standalone 2x1 core"].append(prepare_once(
                props, photos, work / f"cluster-{i}", ["--master", cluster.url, "--py-files",
                                                       str(zip_path / "faceage_code.zip"),
                                                       "--conf", "spark.executor.memory=2g"]))
            print(f"  repeat {i + 1}: local {rows['local[2]'][-1]} cluster {rows['standalone 2x1 core'][-1]}",
                  flush=True)
    return {name: {"median_wall_s": statistics.median(r["wall_s"] for r in v), "runs": v} for name, v in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="fixed-start runs per variant (0: skip)")
    p.add_argument("--busy-runs", type=int, default=3, help="the same with every core busy (0: skip)")
    p.add_argument("--cluster-photos", type=Path, default=None, help="a photo folder for local vs standalone")
    p.add_argument("--cluster-repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="faceage-spark-start-"))
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.runs:
        report["idle"] = fixed_start(work / "idle", args.runs, busy=False)
    if args.busy_runs:
        report["busy"] = fixed_start(work / "busy", args.busy_runs, busy=True)
    if args.cluster_photos:
        report["cluster"] = cluster_vs_local(work / "cl", args.cluster_photos, args.cluster_repeats)
    print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str)[:20000])
    for load in ("idle", "busy"):
        if load in report:
            r = report[load]
            print(f"{load}: 4-photo prepare median wall jars-copied {r['jars-copied']['median_wall_s']:.1f} s, "
                  f"class-path {r['class-path']['median_wall_s']:.1f} s "
                  f"(ratio {r['class-path']['median_wall_s'] / r['jars-copied']['median_wall_s']:.2f})")
    if "cluster" in report:
        c = report["cluster"]
        print(f"cluster: local[2] {c['local[2]']['median_wall_s']:.1f} s, standalone "
              f"{c['standalone 2x1 core']['median_wall_s']:.1f} s (ratio "
              f"{c['standalone 2x1 core']['median_wall_s'] / c['local[2]']['median_wall_s']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
