"""Benchmark: what one commit per run (shell.outputs: staging, a journal, a lock; Delta written from staged
rows) costs prepare, against the code before it (a checkout of an earlier commit), same run, same images.

For each of the two checkouts, interleaved (A B A B ...): prepare N UTKFace chips (`--detector none`) into a
fresh output, then a second run of N/4 other chips into the same output as overwrite and as append, for
Parquet and Delta (Delta's second run is a write into the existing table: before, straight into it; now,
staged as Parquet first, then one idempotent Delta write). Reports the wall time of each second run and the
job's own commit time, the median of --repeats, and the ratio now/before.

    git worktree add /tmp/before <commit>   # the code before (e.g. the commit before issue 20's)
    python -m bench.commit_cost --utkface ../shared/data/utkface --before /tmp/before --n 2000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from schemas import layout
from bench.common import REPO, machine  # noqa: E402


def _photos(utkface: Path, folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # one reject per run: the code before fails on an empty rejects table here (UNABLE_TO_INFER_SCHEMA)
    (folder / f"not-a-photo-{folder.name}.jpg").write_bytes(b"not an image " + folder.name.encode())
    for name in names:
        target = folder / name
        if not target.exists():
            os.symlink(utkface.resolve() / name, target)
    return folder


def _live_rows(table: Path) -> int:
    import pyarrow.parquet as pq


    return sum(pq.ParquetFile(u[len("file://"):]).metadata.num_rows for u in layout.table_files(str(table)))


def _prepare(repo: Path, inputs: Path, output: Path, fmt: str, mode: str) -> float:
    """Wall seconds of one spark-submit prepare with the checkout at `repo` (its own code on PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.time()
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
                           str(repo / "spark_jobs" / "prepare.py"), "--input", str(inputs), "--output", str(output),
                           "--detector", "none", "--format", fmt, "--mode", mode, "--size", "128"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"prepare failed ({repo}): {(done.stdout + done.stderr)[-2000:]}")
    return time.time() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utkface", type=Path, required=True)
    p.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare against")
    p.add_argument("--n", type=int, default=2000, help="chips of the first run (the second adds n/4)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/faceage-commit-bench"))
    args = p.parse_args()
    names = sorted(n for n in os.listdir(args.utkface) if n.endswith(".jpg"))[: args.n + args.n // 4]
    first = _photos(args.utkface, args.work / "first", names[: args.n])
    second = _photos(args.utkface, args.work / "second", names[args.n:])
    results = {}
    for fmt in ("parquet", "delta"):
        for mode in ("overwrite", "append"):
            seconds, rows = {"before": [], "now": []}, {"before": set(), "now": set()}
            for _ in range(args.repeats):
                for label, repo in (("before", args.before.resolve()), ("now", REPO)):
                    out = args.work / f"out-{label}"
                    shutil.rmtree(out, ignore_errors=True)
                    _prepare(repo, first, out, fmt, "overwrite")
                    seconds[label].append(_prepare(repo, second, out, fmt, mode))
                    manifest = json.loads((out / layout.LATEST_MANIFEST).read_text())
                    faces = _live_rows(out / "faces")
                    if ("commit" in manifest["timings_s"]) != (label == "before"):  # the code that ran
                        raise SystemExit(f"{label}: the manifest was not written by the {label} checkout")
                    rows[label].add(faces)
            if rows["before"] != rows["now"] or len(rows["now"]) != 1:  # the same table either way
                raise SystemExit(f"{fmt} {mode}: live rows differ: {rows}")
            row = {k: round(statistics.median(v), 1) for k, v in seconds.items()}
            row["faces"] = rows["now"].pop()
            row["ratio_now_before"] = round(row["now"] / row["before"], 3)
            results[f"{fmt} {mode}"] = row
            print(f"{fmt:8s} {mode:9s} before {row['before']:6.1f} s  now {row['now']:6.1f} s  "
                  f"ratio {row['ratio_now_before']:.3f}", flush=True)
    print(json.dumps({"machine": machine(), "n": args.n, "second_run": args.n // 4, "repeats": args.repeats,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
