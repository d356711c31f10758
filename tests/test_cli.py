"""Every CLI's flags, walked: one name and one default per concept, choices on every enum, defaults in --help,
console scripts whose usage names themselves."""
import argparse
import os
import subprocess
import sys

import pytest

from conftest import REPO
from schemas.crop import DETECTORS
from schemas.tables import SPLITS
from spark_jobs import distributed, emr, evaluate, predict, prepare, score
from trainer import recalibrate, train, tune

PARSERS = {"prepare": prepare, "score": score, "evaluate": evaluate, "predict": predict, "train": train,
           "tune": tune, "distributed": distributed, "emr": emr, "recalibrate": recalibrate}


def options(module):
    parser = module.get_args_parser()
    return parser, {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_every_default_and_errors_are_one_line(name, capsys):
    parser, opts = options(PARSERS[name])
    formatter = parser._get_formatter()
    for opt, action in opts.items():
        if not (action.default is None or action.default is False or action.default is argparse.SUPPRESS) \
                and not isinstance(action, argparse._HelpAction):
            assert "default" in formatter._format_action(action).lower(), f"{name} {opt}: default not shown"
    parser.format_help()  # renders (a bad %-format in a help string would raise here)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{parser.stage}: error: ")


def test_one_name_and_one_default_per_concept():
    seen = {}
    for name, module in PARSERS.items():
        _, opts = options(module)
        for opt, action in opts.items():
            seen.setdefault(opt, []).append((name, action))
        # a Delta version is always --data-version
        for action in set(opts.values()):
            if action.dest in ("version", "data_version", "labels_version"):
                assert "--data-version" in action.option_strings, (name, action.option_strings)
    for opt in ("--detector", "--format", "--mode", "--split", "--device", "--head", "--reader", "--input-kind"):
        for name, action in seen.get(opt, []):
            assert action.choices, f"{name} {opt} has no choices"
    for name, action in seen["--detector"]:
        assert set(action.choices) <= {"auto", *DETECTORS}
    for name, action in seen["--split"]:
        assert tuple(action.choices) == SPLITS
    assert len({action.default for _, action in seen["--max-file-bytes"]}) == 1  # one byte limit
    for name, action in seen["--mode"]:
        assert "overwrite" in action.choices


SCRIPTS = ["faceage-prepare", "faceage-score", "faceage-evaluate", "faceage-predict", "faceage-train",
           "faceage-tune", "faceage-distributed", "faceage-emr"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_name_themselves(script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    if not os.path.exists(path):
        pytest.fail(f"{script} is not installed: rerun make install (setup.cfg lists it)")
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.startswith(f"usage: {script}")
