"""python -m spark_jobs.local_cluster start|stop: a Spark standalone cluster on this machine, for real.

    python -m spark_jobs.local_cluster start --dir /tmp/faceage-cluster --workers 2   # prints the master URL
    spark-submit --master spark://127.0.0.1:PORT --py-files dist/faceage_code.zip spark_jobs/prepare.py ...
    python -m spark_jobs.local_cluster stop --dir /tmp/faceage-cluster

One master and N workers, each its own JVM (`spark-class org.apache.spark.deploy.master.Master` /
`...deploy.worker.Worker`: the pip package has no sbin/ scripts), bound to 127.0.0.1, each worker with its own
work folder, so executors run in other processes with other working directories than the driver, as on a
cluster. The tests start one through `Cluster` and stop it; every wait here has a bound.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional


from shell.cli import entry_points, log, Parser, positive_int
from shell.errors import UserError

HOST = "127.0.0.1"
STATE = "cluster.json"  # in --dir: the master URL, ports and process ids, for `stop` and for readers


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).resolve().parent / "bin" / "spark-class")


class Cluster:
    """A standalone master and `workers` workers (`cores` and `memory` each) under `folder`. With `tied`
    (tests, benchmarks) the daemons die with this process even when it is killed; `start` leaves them running."""

    def __init__(self, folder, workers: int = 2, cores: int = 1, memory: str = "2g", tied: bool = True):
        self.folder = Path(folder)
        self.workers, self.cores, self.memory, self.tied = workers, cores, memory, tied
        self.port, self.ui_port = free_port(), free_port()
        self.procs: List[subprocess.Popen] = []  # [master, worker-0, worker-1, ...]

    @property
    def url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    def _env(self, name: str) -> dict:
        env = dict(os.environ, SPARK_LOCAL_IP=HOST, SPARK_LOG_DIR=str(self.folder / "logs"),
                   SPARK_WORKER_DIR=str(self.folder / name), SPARK_NO_DAEMONIZE="1",
                   SPARK_DAEMON_MEMORY=os.environ.get("SPARK_DAEMON_MEMORY", "512m"))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's python
        return env

    def _spawn(self, name: str, args: List[str]) -> subprocess.Popen:
        log_file = open(self.folder / "logs" / f"{name}.log", "ab")
        # its own process group: stopping (or killing) a worker takes its executors with it
        return subprocess.Popen([spark_class(), *args], env=self._env(name), stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if self.tied else None)

    def start(self, timeout: float = 120.0) -> "Cluster":
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        self.procs.append(self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", HOST,
                                                 "--port", str(self.port), "--webui-port", str(self.ui_port)]))
        try:
            self._wait(lambda s: s is not None, timeout, "the master's web UI")
            for i in range(self.workers):
                work = self.folder / f"worker-{i}"
                work.mkdir(parents=True, exist_ok=True)
                self.procs.append(self._spawn(f"worker-{i}", [
                    "org.apache.spark.deploy.worker.Worker", self.url, "--host", HOST, "--cores", str(self.cores),
                    "--memory", self.memory, "--work-dir", str(work), "--webui-port", str(free_port())]))
            self._wait(lambda s: s is not None and s.get("aliveworkers", 0) >= self.workers, timeout,
                       f"{self.workers} workers to register")
        except BaseException:
            self.stop()
            raise
        self._save()
        return self

    def status(self) -> Optional[dict]:
        """The master's JSON status (workers, applications), or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ui_port}/json/", timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise UserError(f"local cluster: a daemon exited while waiting for {what}; see "
                                f"{self.folder / 'logs'}")
            if ready(self.status()):
                return
            time.sleep(0.5)
        raise UserError(f"local cluster: no {what} within {timeout:.0f} s; see {self.folder / 'logs'}")

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index` and its executors (their process group), as a machine that dies."""
        proc = self.procs[1 + index]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, grace: float = 15.0) -> None:
        """TERM every daemon's process group, KILL what is still there after `grace` seconds."""
        _stop_groups([p.pid for p in self.procs], grace)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        (self.folder / STATE).unlink(missing_ok=True)

    def _save(self) -> None:
        (self.folder / STATE).write_text(json.dumps({"master": self.url, "web_ui": f"http://{HOST}:{self.ui_port}",
                                                     "pids": [p.pid for p in self.procs]}, indent=2))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG); a worker's
    executors follow their worker (Spark's WorkerWatcher)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends them


def _stop_groups(pids: List[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.killpg(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL or not alive:
            return
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(pid) for pid in alive):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("local_cluster", prog="python -m spark_jobs.local_cluster", description=__doc__.splitlines()[0],
               epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", required=True, help="folder for the daemons' logs, work folders and cluster.json")
    p.add_argument("--workers", type=positive_int, default=2, help="worker JVMs")
    p.add_argument("--cores", type=positive_int, default=1, help="cores each worker offers")
    p.add_argument("--memory", default="2g", help="memory each worker offers to executors")
    return p


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    folder = Path(args.dir)
    state = folder / STATE
    if args.action == "stop":
        if not state.exists():
            raise UserError(f"no cluster recorded in {folder} (nothing to stop)")
        _stop_groups(json.loads(state.read_text())["pids"], 15.0)
        state.unlink()
        log.info(f"local_cluster: stopped the cluster in {folder}")
        return 0
    if state.exists():
        raise UserError(f"{state} exists: a cluster may be running there; stop it first")
    cluster = Cluster(folder, args.workers, args.cores, args.memory, tied=False).start()
    for p in cluster.procs:  # the daemons outlive this command; `stop` ends them
        p.returncode = 0
    # stdout holds the master URL alone (MASTER=$(... start ...)); the line for a person goes to stderr
    sys.stderr.write(f"local_cluster: master {cluster.url} ({args.workers} workers x {args.cores} core(s)); web UI "
                     f"http://{HOST}:{cluster.ui_port}; stop with: python -m spark_jobs.local_cluster stop "
                     f"--dir {folder}\n")
    print(cluster.url)
    return 0


main, console_main = entry_points("local_cluster", _job)

if __name__ == "__main__":
    sys.exit(main())
