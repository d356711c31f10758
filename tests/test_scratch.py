"""shell.scratch: a scratch folder a SIGKILLed run left is removed by the next run's, and nothing else is."""
import os
import signal
import subprocess
import sys

from conftest import REPO
from shell import scratch


def _made_by_a_killed_process(root, prefix):
    """The path of a scratch folder made by a child process that was then SIGKILLed (it could not remove it)."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from shell import scratch; "
            f"print(scratch.scratch_dir({prefix!r}, {str(root)!r}), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    return path


def test_a_new_scratch_folder_removes_the_ones_dead_processes_left_and_only_those(tmp_path):
    dead = _made_by_a_killed_process(tmp_path, "faceage-score-")
    (open(os.path.join(dead, "model.pt"), "wb")).write(b"x" * 1000)
    other_kind = _made_by_a_killed_process(tmp_path, "faceage-run-")
    mine = scratch.scratch_dir("faceage-score-", str(tmp_path))  # this live process's: kept
    assert not os.path.exists(dead) and os.path.isdir(mine) and os.path.isdir(other_kind)

    # a live process's folder, another namespace's or machine's, a file, a link: all left alone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = os.path.basename(mine).split("-")[2]
        started = scratch.process_start(live.pid)
        alive = tmp_path / f"faceage-score-{tag}-{live.pid}-{started}-abc"
        reused = tmp_path / f"faceage-score-{tag}-{live.pid}-{int(started) - 1}-abc"  # an earlier holder of the pid
        foreign = tmp_path / f"faceage-score-00000000-{live.pid + 100000}-x-abc"
        a_file = tmp_path / f"faceage-score-{tag}-999999999-x-file"
        link = tmp_path / f"faceage-score-{tag}-999999998-x-link"
        target = tmp_path / "not-ours"
        for d in (alive, reused, foreign, target):
            d.mkdir()
        a_file.write_text("kept")
        link.symlink_to(target)
        assert scratch.sweep("faceage-score-", str(tmp_path)) == [str(reused)]
        assert alive.is_dir() and foreign.is_dir() and a_file.read_text() == "kept" and link.is_symlink()
        assert target.is_dir() and os.path.isdir(mine)
    finally:
        live.kill()
        live.wait(timeout=30)
    # once the live one is gone, its folder goes with the next sweep; the other kind's goes with a folder of its kind
    assert scratch.sweep("faceage-score-", str(tmp_path)) == [str(alive)]
    assert os.path.isdir(other_kind)
    scratch.scratch_dir("faceage-run-", str(tmp_path))
    assert not os.path.exists(other_kind)


def test_scratch_folders_are_made_in_the_temp_folder_by_default(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = scratch.scratch_dir("faceage-report-")
    assert os.path.dirname(path) == str(tmp_path)
    assert f"-{os.getpid()}-{scratch.process_start(os.getpid())}-" in os.path.basename(path)
