"""Where every stage puts things (each name written once, here), and how a reader finds the live files of
a table.

The folders: prepare's output (faces/, rejects/, _runs/, manifest.json), score's (predictions/,
score_manifest.json), a training run's (model.pt, summary.json, metrics.jsonl, checkpoint.pt,
tensorboard/), evaluate's report and a tuning study's folder. No Spark here: the trainer and tests use it
too. Remote URIs (s3a://, hdfs://) go through fsspec when a reader needs them; the writer side (Spark)
lives in spark_jobs/storage.py. The bookkeeping files of any output root (lock, journal, staging) are
output safety's own: shell.outputs.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from schemas.crop import CropSettings
from shell import uri as uris
from shell.errors import UserError
from shell.outputs import JOURNAL
from shell.uri import join, local_path, parent  # noqa: F401 - layout.join & co.: the table paths' own helpers

# the formats a table can be written in (prepare's tables); score's predictions may also be CSV
TABLE_FORMATS = ("parquet", "delta")
PREDICTION_FORMATS = (*TABLE_FORMATS, "csv")

# ---- prepare's output: the two tables, one record per run, the latest run's manifest
FACES_DIR = "faces"
REJECTS_DIR = "rejects"
RUNS_DIR = "_runs"
LATEST_MANIFEST = "manifest.json"

# ---- score's output
PREDICTIONS_DIR = "predictions"
SCORE_MANIFEST = "score_manifest.json"

# ---- a training run's folder (--output of trainer.train)
MODEL = "model.pt"  # the bundle (trainer.bundle)
SUMMARY = "summary.json"
METRICS_LOG = "metrics.jsonl"  # one line per epoch
CHECKPOINT = "checkpoint.pt"  # what --resume continues from
TENSORBOARD = "tensorboard"
RUN_FILES = (CHECKPOINT, METRICS_LOG, MODEL, SUMMARY, TENSORBOARD)

# ---- the model bundle (MODEL): one torch file, these fields (trainer.bundle writes and reads it)
BUNDLE_FORMAT = "faceage-model-bundle"  # the value of its "format" field
BUNDLE_VERSION = 2  # its "format_version": a reader refuses a newer one (2: the std's calibration)
BUNDLE_FIELDS = ("format", "format_version", "state_dict", "head", "input_size", "normalize", "crop", "data",
                 "params", "metrics", "calibration", "torch_version")

# ---- an exported model (python -m trainer.export): the model file and its preprocessing contract beside it
EXPORT_FORMAT = "faceage-export"  # the contract's "format" field
EXPORT_VERSION = 1
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts"}  # what each export format's file name ends in
CONTRACT_SUFFIX = ".json"  # model.onnx -> model.onnx.json
EXPORT_FIELDS = ("format", "format_version", "exported_as", "source_model_id", "head", "input_size", "normalize",
                 "crop", "framing", "calibration", "input", "outputs", "data", "params", "metrics", "exported_with")


def contract_path(model_file: str) -> str:
    """Where an exported model's contract lies: beside it, its name plus CONTRACT_SUFFIX."""
    return model_file + CONTRACT_SUFFIX

# ---- evaluate's report folder
EVAL_METRICS = "metrics.json"
EVAL_SLICES = "slices.csv"
EVAL_CONFUSION = "confusion.csv"
EVAL_HTML = "report.html"
PLOT_CONFUSION = "confusion.png"
PLOT_MAE_BY_AGE = "mae_by_age_group.png"
PLOT_PRED_VS_TRUE = "pred_vs_true.png"
PLOT_UNCERTAINTY = "uncertainty.png"
PLOT_RELIABILITY = "reliability.png"
PLOT_RISK_COVERAGE = "risk_coverage.png"
PLOT_TRAINING_CURVES = "training_curves.png"
EVAL_FILES = (EVAL_METRICS, EVAL_SLICES, EVAL_CONFUSION, PLOT_CONFUSION, PLOT_MAE_BY_AGE, PLOT_PRED_VS_TRUE,
              PLOT_UNCERTAINTY, PLOT_RELIABILITY, PLOT_RISK_COVERAGE, PLOT_TRAINING_CURVES, EVAL_HTML)

# ---- a tuning study's folder (--output of trainer.tune)
STUDY_DB = "optuna.db"  # the default storage, a SQLite file
TRIALS_DIR = "trials"  # one training run's folder per trial
BEST_PARAMS = "best_params.json"
TUNE_REPORT = "report.json"
PLOT_HISTORY = "optimization_history.png"
PLOT_IMPORTANCES = "param_importances.png"
PLOT_BEST_CURVE = "best_trial_curve.png"
TUNE_FILES = (BEST_PARAMS, TUNE_REPORT, PLOT_HISTORY, PLOT_IMPORTANCES, PLOT_BEST_CURVE)


class IncompleteTableError(RuntimeError):
    """A table a reader must not trust (a killed or unfinished write)."""


def faces_uri(output: str) -> str:
    return join(output, FACES_DIR)


def rejects_uri(output: str) -> str:
    return join(output, REJECTS_DIR)


def is_delta(uri: str) -> bool:
    path = local_path(uri)
    if path is not None:
        return os.path.isdir(os.path.join(path, "_delta_log"))
    return uris.RemoteFS().exists(join(uri, "_delta_log"))


def delta_table(uri: str, version: Optional[int] = None):
    """deltalake's DeltaTable at a local path or URI (an S3-compatible endpoint from the environment)."""
    from deltalake import DeltaTable

    return DeltaTable(uris.delta_uri(uri), version=version, storage_options=uris.delta_options(uri) or None)


def check_no_pending_commit(root: str, exists=None) -> None:
    """IncompleteTableError when a commit into `root` was interrupted: some of its entries may be one run's
    and the rest another's, so nothing there is read until a writer finished it (shell.outputs)."""
    uri = join(root, JOURNAL)
    if exists is None:
        path = local_path(uri)
        if path is not None:
            found = os.path.exists(path)
        else:
            found = uris.RemoteFS().exists(uri)
    else:
        found = exists(uri)
    if found:
        raise IncompleteTableError(
            f"{root}: a faceage run was killed while it committed its outputs there ({JOURNAL}); some may be "
            f"from that run, some from the one before. Rerun the job that writes {root} (with the same --output): "
            f"it finishes that commit first")


def table_files(uri: str, version: Optional[int] = None) -> List[str]:
    """The live data files of a faces/rejects table, as URIs a Parquet reader can open.

    Delta: the files of `version` (default: latest) from the transaction log, never a directory
    scan (that would also read removed files). Parquet: every part file, but only when Spark's
    `_SUCCESS` marker says the write finished; otherwise IncompleteTableError (so too while a commit into
    the table's folder is unfinished).
    """
    check_no_pending_commit(parent(uri))
    if is_delta(uri):
        try:
            table = delta_table(uri, version)
        except Exception as e:  # noqa: BLE001 - deltalake raises its own error types for a missing version
            if version is None:
                raise ValueError(f"{uri}: cannot read the Delta table ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})") from None
            latest = delta_table(uri).version()
            raise ValueError(f"{uri}: Delta version {version} does not exist (versions 0..{latest}); "
                             f"give one of those, or leave the version out for the latest") from None
        files = [("file://" + f) if f.startswith("/") else f for f in table.file_uris()]  # s3:// for s3a://
        if version is not None:  # an old version's files may have been removed by VACUUM since
            _check_not_vacuumed(uri, version, files)
        return files
    if version is not None:
        raise ValueError(f"{uri} is a Parquet directory: --data-version applies to Delta tables only")
    path = local_path(uri)
    if path is None:
        remote = uris.RemoteFS()
        if not remote.exists(uri):
            raise FileNotFoundError(_missing_message(uri))
        if not remote.exists(join(uri, "_SUCCESS")):
            raise IncompleteTableError(_incomplete_message(uri))
        return [join(uri, rel) for rel in remote.walk_files(uri)
                if rel.endswith(".parquet") and not any(part[:1] in "_." for part in rel.split("/"))]
    if not os.path.isdir(path):
        raise FileNotFoundError(_missing_message(uri))
    if not os.path.exists(os.path.join(path, "_SUCCESS")):
        raise IncompleteTableError(_incomplete_message(uri))
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".parquet") and not f.startswith(("_", "."))]
    return ["file://" + f for f in files]


def _missing(files: List[str]) -> int:
    return sum(1 for f in files if not uris.exists(f))


def _check_not_vacuumed(uri: str, version: int, files: List[str]) -> None:
    """ValueError naming the oldest version still whole when files of `version` are gone (VACUUM)."""
    gone = _missing(files)
    if not gone:
        return
    latest = delta_table(uri).version()
    oldest = latest
    for v in range(latest - 1, version, -1):  # newest first: the first version with a file gone ends the search
        older = [("file://" + f) if f.startswith("/") else f for f in delta_table(uri, v).file_uris()]
        if _missing(older):
            break
        oldest = v
    raise ValueError(f"{uri}: Delta version {version}'s data files were removed by VACUUM ({gone} of {len(files)} "
                     f"gone); the oldest version still whole is {oldest} (latest {latest}): give --data-version "
                     f"{oldest} or later, or leave it out for the latest")


PREPARE_JOB, SCORE_JOB = "spark_jobs/prepare.py", "spark_jobs/score.py"  # the jobs that write tables


def _incomplete_message(uri: str, writer: str = PREPARE_JOB) -> str:
    """Why a Parquet folder without Spark's _SUCCESS marker is not read, and what to do (`writer`: the job
    that writes such tables)."""
    return (f"{uri} has no _SUCCESS marker: the {writer} run that wrote it did not finish (killed or failed). "
            f"Rerun {writer} with --mode overwrite, or use --format delta for tables that always show their "
            f"last committed version")


def _missing_message(uri: str, writer: str = PREPARE_JOB) -> str:
    return f"{uri}: no such table (nothing there; run {writer} to write it, or check the path)"


def faces_table(data_uri: str) -> str:
    """The faces table of a prepare output root, or `data_uri` itself when it already names faces/."""
    return data_uri.rstrip("/") if data_uri.rstrip("/").endswith("/" + FACES_DIR) else faces_uri(data_uri)


def output_root(data_uri: str) -> str:
    """The prepare output root of a root or of its faces/ table."""
    root = data_uri.rstrip("/")
    return root[: -len(FACES_DIR) - 1] if root.endswith("/" + FACES_DIR) else root


def read_text(uri: str) -> str:
    """A small text file at a local path, file: URI or any fsspec URI (s3://, gs://, hdfs://, ...)."""
    return uris.read_text(uri)


def read_prepare_manifest(data_uri: str) -> dict:
    """The run manifest (manifest.json) of the prepare output holding `data_uri`'s table.

    Fails loudly (shell.errors.UserError) when it is missing or unreadable: a caller never guesses."""
    uri = join(output_root(data_uri), LATEST_MANIFEST)
    try:
        check_no_pending_commit(output_root(data_uri))
    except IncompleteTableError as e:
        raise UserError(str(e)) from None
    try:
        data = json.loads(read_text(uri))
    except FileNotFoundError:
        raise UserError(f"{uri}: no prepare run manifest beside the table; the crop settings the model must "
                        f"score with are recorded there (prepare the data with spark_jobs/prepare.py)") from None
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{uri}: cannot read the prepare run manifest ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings", {}).get("crop"), dict):
        raise UserError(f"{uri}: not a prepare run manifest (no settings.crop)")
    return data


def table_crop_settings(data_uri: str):
    """The CropSettings the table under `data_uri` was prepared with (from its run manifest)."""
    uri = join(output_root(data_uri), LATEST_MANIFEST)
    return CropSettings.from_dict(read_prepare_manifest(data_uri)["settings"]["crop"], uri)
