"""The job shell every stage shares: one user-error type, one error line, one exit code.

Every CLI (prepare, score, evaluate, train, tune, emr) builds its parser with `Parser` and runs its
job inside `run_main`, so a user's mistake always ends as ONE line on stderr,

    <stage>: error: <what is wrong and what to do>

with exit code 2 and every credential redacted, while an unexpected internal error keeps its
traceback (exit 1). Flag values are checked while parsing by the typed converters below (finite
numbers in range, positive ints, fractions), and `--params` files go through the same converters
(`apply_params`), so there is one validation path for flags and params.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import sys
import uuid
from typing import Callable, Iterable, List, Optional, Sequence

from shell.errors import DISK_FULL_EXIT, USAGE_EXIT, UserError, disk_full
from shell.uri import check, describe_jvm_error

LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("faceage")  # every stage's own lines: `log.info(...)`, shown at the chosen level


class _CurrentStdout(logging.Handler):
    """Writes to whatever sys.stdout is at the time (a test's capture, a redirected worker log)."""

    def emit(self, record):
        try:
            sys.stdout.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never take the job down
            self.handleError(record)


def configure_logging(level: Optional[str] = None) -> None:
    """The faceage logger at `level` (or $FACEAGE_LOG_LEVEL, default info), one plain line per message on
    stdout; Spark's own JVM logging follows $FACEAGE_SPARK_LOG_LEVEL (spark_jobs/log4j2.properties)."""
    configured = any(isinstance(h, _CurrentStdout) for h in log.handlers)
    if level is None and configured:
        return  # a nested parse (e.g. tune checking its --train-args) keeps the level already chosen
    level = (level or os.environ.get("FACEAGE_LOG_LEVEL") or "info").lower()
    if level not in LOG_LEVELS:
        level = "info"
    if not configured:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())
    if level == "debug":
        os.environ.setdefault("FACEAGE_SPARK_LOG_LEVEL", "info")  # a JVM started from here on says more


# ----------------------------------------------------------------------------- redaction

# scheme://user:secret@host -> scheme://user:***@host ; key=secret / "key": "secret" for secret-looking keys
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")
_SECRET_KEYS = r"(?:password|passwd|pwd|secret|token|credential|api[_.\-]?key|access[_.\-]?key)"
_KEY_VALUE = re.compile(r"(?i)(?P<key>[\w.\-]*" + _SECRET_KEYS + r"[\w.\-]*)(?P<sep>\s*[=:]\s*[\"']?)"
                        r"(?P<value>[^\s\"',;&}]+)")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "DATABRICKS_TOKEN")


def redact(text) -> str:
    """`text` with credentials replaced by ***: passwords in URLs, secret-looking key=value pairs, and the
    values of well-known secret environment variables wherever they appear."""
    text = str(text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}***", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def redact_all(values: Iterable) -> List[str]:
    return [redact(v) for v in values]


def redacted(value):
    """`value` (settings: dicts, lists, strings, numbers) with every string redacted, recursively: the one step
    every recorded setting passes before it is stored (bundle, checkpoint, manifest, tracking)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    return value


# ----------------------------------------------------------------------------- strict JSON

def plain(value):
    """`value` with every non-finite float (NaN, +-inf) replaced by None, recursively: JSON a strict
    parser (and every other language) reads."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return plain(value.item())  # numpy scalars
        except (TypeError, ValueError):
            return value
    return value


def dumps(value, **kw) -> str:
    """Strict JSON (never NaN/Infinity): non-finite numbers become null."""
    kw.setdefault("indent", 2)
    return json.dumps(plain(value), allow_nan=False, **kw)


# ----------------------------------------------------------------------------- run ids

def new_run_id() -> str:
    """A sortable, unique run id: UTC time + 8 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


# ----------------------------------------------------------------------------- typed flag values

def _number(text, kind: type, what: str):
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a number")
    if kind is int and isinstance(text, float):
        if not math.isfinite(text) or not text.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        return int(text)
    try:
        value = kind(text) if not isinstance(text, str) else (int(text, 10) if kind is int else float(text))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") \
            from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def number(low: Optional[float] = None, high: Optional[float] = None, *, integer: bool = False,
           low_open: bool = False) -> Callable:
    """argparse `type=`: a finite float (or int) within [low, high] (low excluded with low_open)."""
    kind = int if integer else float

    def convert(text):
        value = _number(text, kind, "value")
        if integer and isinstance(value, float):
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be <= {high:g}")
        return value

    convert.__name__ = "whole number" if integer else "number"  # argparse names the type in its messages
    return convert


positive_int = number(1, integer=True)
non_negative_int = number(0, integer=True)
fraction = number(0.0, 1.0)


# ----------------------------------------------------------------------------- the parser

class Parser(argparse.ArgumentParser):
    """argparse with the house rules: defaults shown in --help, and a bad flag is one line
    `<stage>: error: ...` with exit 2 (argparse's own usage dump is left out; --help shows it)."""

    def __init__(self, stage: str, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if invoked.startswith("faceage-"):  # a console script: its usage names the command that was typed
            kw["prog"] = invoked
        super().__init__(**kw)
        self.stage = stage
        talk = self.add_mutually_exclusive_group()
        talk.add_argument("--quiet", dest="log_level", action="store_const", const="warning",
                          help="only warnings and errors (or set FACEAGE_LOG_LEVEL)")
        talk.add_argument("--verbose", dest="log_level", action="store_const", const="debug",
                          help="more detail, Spark's INFO lines included")

    def add_argument(self, *args, **kw):
        if not kw.get("help") and not _no_default(kw.get("default")):
            kw["help"] = "(default: %(default)s)"  # argparse prints no default for a flag without help
        return super().add_argument(*args, **kw)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        configure_logging(getattr(parsed, "log_level", None))
        return parsed, rest

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"{self.stage}: error: {redact(message)} (see --help)\n")
        sys.exit(USAGE_EXIT)


def _no_default(value) -> bool:
    """None, False (a flag's off) and SUPPRESS say nothing in --help; 0 and 0.0 are real defaults."""
    return value is None or value is False or value is argparse.SUPPRESS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help; descriptions and epilogs kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "(default" in text or _no_default(action.default):
            return text
        return text + " (default: %(default)s)"


def apply_params(parser: argparse.ArgumentParser, args, params, argv: Sequence[str], source: str) -> None:
    """Set flag values from a dict (a --params JSON file): each value goes through the flag's own type
    and choices, exactly as if typed; flags typed on the command line win. UserError otherwise."""
    if not isinstance(params, dict):
        raise UserError(f"{source}: holds a JSON {type(params).__name__}, not an object of flag values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(set(params) - set(actions))
    if unknown:
        raise UserError(f"{source}: unknown keys {unknown}; known: {sorted(actions)}")
    typed = {a.dest for a in actions.values() for opt in a.option_strings
             if any(word == opt or word.startswith(opt + "=") for word in argv)}
    for key, value in params.items():
        action = actions[key]
        value = _param_value(action, key, value, source)
        if key not in typed:
            setattr(args, key, value)


def _param_value(action, key: str, value, source: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, not {json.dumps(value)}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"{source}: {key} is null; give a value (default {action.default!r}) or leave the key out")
    convert = action.type
    if convert is int or getattr(convert, "__name__", "") == "whole number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a whole number, not {json.dumps(value)}")
    elif convert is float or getattr(convert, "__name__", "") == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a number, not {json.dumps(value)}")
    elif not isinstance(value, str):
        raise UserError(f"{source}: {key} must be a string, not {json.dumps(value)}")
    if convert is not None:
        try:
            value = convert(value if not isinstance(value, str) or convert in (int, float) else value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise UserError(f"{source}: {key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{source}: {key} {json.dumps(value)} is not one of {list(action.choices)}")
    return value


# ----------------------------------------------------------------------------- the error boundary

def run_main(stage: str, body: Callable[[], int], extra_user_errors: tuple = ()) -> int:
    """Run a CLI body: UserError (and `extra_user_errors`) -> one redacted line on stderr, exit 2 (or the
    error's own `exit_code`). Anything else is a bug and keeps its traceback."""
    try:
        return int(body() or 0)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_EXIT)
    except (UserError, *extra_user_errors) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"{stage}: error: {redact(text)}\n")
        return getattr(e, "exit_code", USAGE_EXIT)  # e.g. 3: Spark itself did not start
    except KeyboardInterrupt:
        sys.stderr.write(f"{stage}: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a storage error from Spark's JVM (no bucket, no access) is the user's
        full = disk_full(e)
        if full is not None:  # the machine's, not the user's input: its own exit code
            sys.stderr.write(f"{stage}: error: {redact(full)}\n")
            return DISK_FULL_EXIT
        text = describe_jvm_error(e)
        if text is None:
            raise
        sys.stderr.write(f"{stage}: error: {redact(text)}\n")
        return USAGE_EXIT


def pause_point(name: str) -> None:
    """A test hook at a named moment of a job (a task's start, a commit point): with FACEAGE_PAUSE_AT=name,
    write `<name>-<pid>` (holding the working folder) into FACEAGE_PAUSE_DIR, then wait until a file
    `release` appears there, at most FACEAGE_PAUSE_SECONDS (default 60). A no-op otherwise."""
    if os.environ.get("FACEAGE_PAUSE_AT") != name or not os.environ.get("FACEAGE_PAUSE_DIR"):
        return
    import time

    folder = os.environ["FACEAGE_PAUSE_DIR"]
    with open(os.path.join(folder, f"{name}-{os.getpid()}"), "w") as f:
        f.write(os.getcwd())
    deadline = time.time() + float(os.environ.get("FACEAGE_PAUSE_SECONDS", "60"))
    while time.time() < deadline and not os.path.exists(os.path.join(folder, "release")):
        time.sleep(0.1)


def entry_points(stage: str, job: Callable[[Optional[List[str]]], int]):
    """(main, console_main) for a CLI whose work is `job(argv) -> exit code`: main(argv) runs it inside
    the error boundary and returns the exit code; console_main() is the console script (sys.exit)."""
    def main(argv: Optional[List[str]] = None) -> int:
        return run_main(stage, lambda: job(argv))

    def console_main() -> None:
        sys.exit(main())

    main.__doc__ = f"The {stage} CLI: exit 0, or 2 with one `{stage}: error: ...` line for a user's mistake."
    return main, console_main


def path_arg(text):
    """argparse `type=` for every path flag: a local path, a file: URI or a well-formed remote URI
    (s3://, s3a://, gs://, hdfs://); a mistyped URI such as `s3:/bucket` is refused, never made a local folder."""
    try:
        return check(text, "value")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)[len("value "):]) from None


path_arg.__name__ = "path or URI"
