"""One commit per run, one writer per output: shell.outputs' journal and lock, then every stage's real
job killed -9 at its commit points (a test hook pauses it there) and rerun."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, encode, spark_submit, synthetic_face, venv_env
from schemas import layout
from shell.errors import UserError
from shell.outputs import JOURNAL, LOCK, OutputBusyError, Outputs, STAGING_PREFIX

# a writer of two entries (a folder and a file) through Outputs, pausable at its commit points
WRITER = textwrap.dedent("""
    import sys
    from shell.outputs import Outputs
    root, tag = sys.argv[1], sys.argv[2]
    out = Outputs.at(root, "test").begin()
    try:
        out.check(["table", "manifest.json"])
        out.fs.mkdirs(out.staging("table"))
        out.fs.write_text(out.staging("table") + "/part-0", tag)
        out.stage_text("manifest.json", tag)
        out.commit(["table", "manifest.json"])
    finally:
        out.finish()
""")


def _write(root: Path, tag: str, pause_at: str = "", pause_dir: Path = None) -> subprocess.Popen:
    env = venv_env(PYTHONPATH=str(REPO))
    if pause_at:
        env.update(FACEAGE_PAUSE_AT=pause_at, FACEAGE_PAUSE_DIR=str(pause_dir), FACEAGE_PAUSE_SECONDS="300")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), tag], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_at(proc: subprocess.Popen, pauses: Path, point: str, timeout: float = 600) -> None:
    """SIGKILL `proc` (its whole process group: a JVM too) once it paused at `point`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(pauses.glob(f"{point}-*")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before it reached {point}: "
                        f"{(proc.stdout.read() if proc.stdout else '')[-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the job never reached {point} in {timeout:.0f} s")


def _state(root: Path):
    return (root / "table" / "part-0").read_text(), (root / "manifest.json").read_text()


def test_a_commit_killed_after_its_commit_point_is_refused_by_readers_then_rolled_forward(tmp_path, caplog):
    root, pauses = tmp_path / "out", tmp_path / "pauses"
    pauses.mkdir()
    assert _write(root, "old").wait(timeout=120) == 0
    assert _state(root) == ("old", "old")
    kill_at(_write(root, "new", "commit-step", pauses), pauses, "commit-step")
    # the table is already the new run's, the manifest still the old one's: readers must not look
    assert (root / "table" / "part-0").read_text() == "new" and (root / "manifest.json").read_text() == "old"
    with pytest.raises(layout.IncompleteTableError, match="killed while it committed"):
        layout.check_no_pending_commit(str(root))
    with pytest.raises(layout.IncompleteTableError):
        layout.table_files(str(root / "table"))
    with caplog.at_level(logging.WARNING, logger="faceage"):
        out = Outputs.at(str(root), "test").begin()  # the next writer: the killed holder's lock, then the journal
        out.finish()
    assert _state(root) == ("new", "new")
    assert [r for r in caplog.messages if "took over the lock" in r]
    assert [r for r in caplog.messages if "finished the commit of run" in r]
    assert not [p for p in root.iterdir() if p.name.startswith("_faceage_")]  # no staging, journal or lock
    layout.check_no_pending_commit(str(root))


def test_a_commit_killed_before_its_commit_point_keeps_the_old_state_and_its_leftovers_go(tmp_path, caplog):
    root, pauses = tmp_path / "out", tmp_path / "pauses"
    pauses.mkdir()
    assert _write(root, "old").wait(timeout=120) == 0
    kill_at(_write(root, "new", "commit-before", pauses), pauses, "commit-before")
    assert _state(root) == ("old", "old")
    layout.check_no_pending_commit(str(root))  # nothing pending: readers read the old state
    assert [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    with caplog.at_level(logging.WARNING, logger="faceage"):
        proc = _write(root, "third")
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
    assert _state(root) == ("third", "third")
    assert not [p for p in root.iterdir() if p.name.startswith("_faceage_")]


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path, monkeypatch):
    root = tmp_path / "out"
    first = Outputs.at(str(root), "prepare").begin()
    second = Outputs.at(str(root), "score")
    with pytest.raises(OutputBusyError, match=f"being written by run {first.run_id}") as err:
        second.begin()
    assert err.value.exit_code == 4 and f"pid {os.getpid()}" in str(err.value)
    first.finish()
    assert not root.exists()  # made for the lock, nothing committed: removed again
    second.begin().finish()  # free again
    root.mkdir()

    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"writer": "faceage", "run_id": "r-dead", "kind": "prepare", "pid": dead.pid,
              "host": socket.gethostname(), "heartbeat_unix": time.time()}
    (root / LOCK).write_text(json.dumps(holder))
    Outputs.at(str(root), "prepare").begin().finish()  # same host, pid gone: taken over

    # killed but not reaped yet (a zombie answers kill(pid, 0)): a Spark driver whose JVM was killed with it
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    (root / LOCK).write_text(json.dumps({**holder, "pid": zombie.pid,
                                         "pid_start": Path(f"/proc/{zombie.pid}/stat").read_text()
                                         .rsplit(")", 1)[1].split()[19]}))
    Outputs.at(str(root), "prepare").begin().finish()  # taken over while the zombie is still there
    zombie.wait()

    far = {**holder, "host": "another-host", "pid": 1}
    (root / LOCK).write_text(json.dumps(far))
    with pytest.raises(OutputBusyError, match="another-host"):
        Outputs.at(str(root), "prepare").begin()  # another machine, heartbeat fresh: it may still run
    (root / LOCK).write_text(json.dumps({**far, "heartbeat_unix": time.time() - 3600}))
    monkeypatch.setenv("FACEAGE_LOCK_STALE_S", "600")
    Outputs.at(str(root), "prepare").begin().finish()  # its heartbeat stopped an hour ago: taken over
    assert not (root / LOCK).exists()


def test_a_journal_whose_step_this_job_cannot_apply_is_one_line(tmp_path):
    root = tmp_path / "out"
    staging = root / (STAGING_PREFIX + "r1")
    staging.mkdir(parents=True)
    (root / JOURNAL).write_text(json.dumps({"writer": "faceage", "run_id": "r1", "kind": "prepare",
                                                   "staging": staging.name,
                                                   "steps": [{"how": "delta", "name": "faces"}]}))
    with pytest.raises(UserError, match="rerun the job that wrote it \\(prepare\\)"):
        Outputs.at(str(root), "evaluate").begin()
    assert not (root / LOCK).exists()  # a failed begin leaves no lock behind


# ----------------------------------------------------------------------------- the real jobs

def _photos(folder: Path, n: int, first_seed: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        age = 20 + (first_seed + i) % 50
        (folder / f"{age}_0_0_2026010100{first_seed + i:05d}.jpg").write_bytes(
            encode(synthetic_face(age, seed=first_seed + i, size=64)))
    return folder


PREPARE_FLAGS = ("--detector", "none", "--size", "32")  # every prepare of these tests, in a process or here


def _prepare(inputs: Path, output: Path, *extra: str, pause_at: str = "", pauses: Path = None) -> subprocess.Popen:
    env = venv_env()
    if pause_at:
        env.update(FACEAGE_PAUSE_AT=pause_at, FACEAGE_PAUSE_DIR=str(pauses), FACEAGE_PAUSE_SECONDS="300")
    return subprocess.Popen([spark_submit(), "--master", "local[2]", str(REPO / "spark_jobs" / "prepare.py"),
                             "--input", str(inputs), "--output", str(output), *PREPARE_FLAGS, *extra], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(table: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(u[len("file://"):]).metadata.num_rows for u in layout.table_files(str(table)))


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


def _in_process(main, argv, capsys) -> str:
    """A job run in this process, on the suite's Spark session (only the killed run needs a process of its own
    for SIGKILL); returns what it printed (its log lines go to stdout)."""
    capsys.readouterr()
    code = main(list(argv))
    printed = capsys.readouterr()
    assert code == 0, printed.out[-2000:] + printed.err[-2000:]
    return printed.out + printed.err


@pytest.mark.parametrize("fmt, mode", [("parquet", "append"), ("delta", "append"), ("parquet", "overwrite")])
def test_prepare_killed_inside_its_commit_loses_no_committed_row(fmt, mode, spark, tmp_path, capsys):
    """12 rows committed, a run of 4 (spark-submit) killed between its commit steps: readers refuse the half-made
    state; the rerun finishes the killed commit, then commits its own. Append: 16 rows, the rerun's 4 photos
    already there (content hashes). Overwrite: the rerun's 4."""
    from spark_jobs import prepare

    first, more = _photos(tmp_path / "first", 12, 0), _photos(tmp_path / "more", 4, 100)
    out, pauses = tmp_path / "out", tmp_path / "pauses"
    pauses.mkdir()
    common = ("--format", fmt, "--splits", "1,0,0")
    here = (*common, *PREPARE_FLAGS)
    _in_process(prepare.main, ("--input", str(first), "--output", str(out), *here), capsys)
    assert _rows(out / "faces") == 12
    kill_at(_prepare(more, out, *common, "--mode", mode, pause_at="commit-step", pauses=pauses),
            pauses, "commit-step")
    with pytest.raises(layout.IncompleteTableError, match="killed while it committed"):
        layout.table_files(str(out / "faces"))
    log = _in_process(prepare.main, ("--input", str(more), "--output", str(out), *here, "--mode", mode), capsys)
    assert "finished the commit of run" in log
    manifest = json.loads((out / "manifest.json").read_text())
    if mode == "overwrite":
        assert _rows(out / "faces") == 4 and manifest["counts"]["faces"] == 4
        assert not [p for p in out.iterdir() if p.name.startswith("_faceage_")]
        return
    assert _rows(out / "faces") == 16
    assert manifest["counts"]["faces"] == 0 and manifest["rejects_by_reason"] == {"duplicate": 4}
    if fmt == "delta":
        from deltalake import DeltaTable

        assert DeltaTable(str(out / "faces")).version() == 2  # v0, the killed run's v1 (once), the rerun's v2
        assert manifest["table_versions"]["faces"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith("_faceage_")]


def test_two_prepares_on_one_output_the_second_is_refused_naming_the_first(spark, tmp_path, capsys):
    from spark_jobs import prepare

    photos = _photos(tmp_path / "photos", 3, 0)
    out, pauses = tmp_path / "out", tmp_path / "pauses"
    pauses.mkdir()
    first = _prepare(photos, out, pause_at="commit-before", pauses=pauses)
    deadline = time.time() + 600
    while not list(pauses.glob("commit-before-*")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    try:  # the second: this process (another pid), while the first holds the output
        code = prepare.main(["--input", str(photos), "--output", str(out), "--detector", "none"])
    finally:
        (pauses / "release").write_text("")
    err = capsys.readouterr().err
    assert code == 4, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prepare: error:")]
    assert len(lines) == 1 and "is being written by run" in lines[0] and "prepare, pid" in lines[0]
    _finish(first)  # the first goes on and commits
    assert _rows(out / "faces") == 3


def _job(script: str, *args: str, pause_at: str = "", pauses: Path = None) -> subprocess.Popen:
    env = venv_env()
    if pause_at:
        env.update(FACEAGE_PAUSE_AT=pause_at, FACEAGE_PAUSE_DIR=str(pauses), FACEAGE_PAUSE_SECONDS="300")
    return subprocess.Popen([spark_submit(), "--master", "local[2]", str(REPO / "spark_jobs" / script), *args],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_score_and_evaluate_killed_inside_their_commits_then_rerun(bundles, tables, tmp_path, capsys):
    """score: predictions/ from one run and score_manifest.json from another is never read (evaluate refuses
    in one line); the rerun finishes the commit, then commits its own. evaluate: the same for its report.
    The killed runs are spark-submit jobs; the others run here, on the suite's Spark session."""
    import pyarrow.parquet as pq

    from spark_jobs import evaluate as evaluate_job, score as score_job

    root, _, _ = tables
    plain, _ = bundles
    scored, report, pauses = tmp_path / "scored", tmp_path / "report", tmp_path / "pauses"
    pauses.mkdir()
    score = ("--model", str(plain), "--input", str(root / "pq" / "faces"), "--input-kind", "table",
             "--split", "test", "--output", str(scored))
    evaluate = ("--predictions", str(scored), "--labels", str(root / "pq"), "--split", "test",
                "--output", str(report))
    _in_process(score_job.main, score, capsys)
    _in_process(evaluate_job.main, evaluate, capsys)
    first_report = (report / "metrics.json").read_text()

    kill_at(_job("score.py", *score, pause_at="commit-step", pauses=pauses), pauses, "commit-step")
    capsys.readouterr()
    code = evaluate_job.main(list(evaluate))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("evaluate: error:")]
    assert code == 2 and len(lines) == 1 and "killed while it committed" in lines[0], err[-2000:]
    assert (report / "metrics.json").read_text() == first_report  # the refused evaluate changed nothing

    log = _in_process(score_job.main, score, capsys)
    assert "finished the commit of run" in log
    manifest = json.loads((scored / "score_manifest.json").read_text())
    runs = set(pq.read_table(str(scored / "predictions"), columns=["score_run_id"]).column(0).to_pylist())
    assert runs == {manifest["run_id"]}  # the predictions and their manifest are one run's

    for name in os.listdir(pauses):
        os.remove(pauses / name)
    kill_at(_job("evaluate.py", *evaluate, pause_at="commit-step", pauses=pauses), pauses, "commit-step")
    assert (report / JOURNAL).exists()
    log = _in_process(evaluate_job.main, evaluate, capsys)
    assert "finished the commit of run" in log
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["rows"]["matched"] > 0 and (report / "report.html").exists()
    assert not [p for p in report.iterdir() if p.name.startswith("_faceage_")]


def test_train_killed_inside_its_commit_leaves_a_bundle_no_reader_takes_until_the_rerun(tables, tmp_path, capsys):
    """model.pt of the new run beside summary.json of the old one is refused (score/predict load through
    bundle.load_bundle); the rerun finishes the commit, then trains and commits its own pair."""
    import torch

    from trainer import train as train_job
    from trainer.bundle import BundleError, load_bundle

    root, _, _ = tables
    out, pauses = tmp_path / "run", tmp_path / "pauses"
    pauses.mkdir()

    args = ["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--image-size", "32",
            "--batch-size", "16", "--workers", "1", "--reader", "pyarrow", "--no-progress"]

    def train(seed: str, **pause) -> subprocess.Popen:  # the killed run: a process of its own
        env = venv_env(PYTHONPATH=str(REPO))
        if pause:
            env.update(FACEAGE_PAUSE_AT=pause["at"], FACEAGE_PAUSE_DIR=str(pauses), FACEAGE_PAUSE_SECONDS="300")
        return subprocess.Popen([sys.executable, "-m", "trainer.train", *args, "--seed", seed], cwd=REPO, env=env,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    _in_process(train_job.main, [*args, "--seed", "1"], capsys)
    kill_at(train("2", at="commit-step"), pauses, "commit-step")
    with pytest.raises(BundleError, match="killed while it committed"):
        load_bundle(str(out / "model.pt"))
    log = _in_process(train_job.main, [*args, "--seed", "3"], capsys)
    assert "finished the commit of run" in log
    summary = json.loads((out / "summary.json").read_text())
    bundle = torch.load(out / "model.pt", weights_only=True)
    assert bundle["params"]["seed"] == 3 and bundle["metrics"]["test_mae"] == pytest.approx(summary["test_mae"])
    load_bundle(str(out / "model.pt"))
