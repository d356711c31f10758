"""MLflow experiment tracking: optional, but the same for every stage that uses it.

On when a stage gets `--mlflow [URI]` or MLFLOW_TRACKING_URI is set (a local store such as
sqlite:///mlflow.db, or a tracking server); off otherwise, and then nothing imports mlflow.

- trainer.train: one run per training (params, per-epoch metrics, test metrics, the bundle as an
  artifact and as an `mlflow.pyfunc` model that scores a faces table's crops; --register-model NAME
  registers it). Its run id is recorded in the bundle (params.mlflow_run_id).
- trainer.tune: one parent run per study call, each trial a nested run (the trainer's run with
  parent_run_id), the best value and params on the parent.
- spark_jobs/evaluate.py: metrics and the report's files logged to the scored model's run (found
  through the score manifest), or to a run of its own when the model was not tracked.
"""
from __future__ import annotations

import os
from typing import Optional

DEFAULT_EXPERIMENT = "faceage"
PYFUNC_NAME = "model"  # the pyfunc model's name inside its run
ENV_URI = "MLFLOW_TRACKING_URI"
FROM_ENV = "env"  # --mlflow without a value: $MLFLOW_TRACKING_URI, else a local sqlite store


def add_arguments(parser, register: bool = False) -> None:
    parser.add_argument("--mlflow", nargs="?", const=FROM_ENV, default=None, metavar="TRACKING_URI",
                        help="log to MLflow: a tracking URI (sqlite:///mlflow.db, http://host:5000, ...); without "
                             "a value $MLFLOW_TRACKING_URI or sqlite:///mlflow.db. On too whenever "
                             "MLFLOW_TRACKING_URI is set")
    parser.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    if register:
        parser.add_argument("--register-model", default=None, metavar="NAME",
                            help="with MLflow on: register the bundle's pyfunc model under NAME (a new version)")


def tracking_uri(value: Optional[str]) -> Optional[str]:
    """The tracking URI to use, or None when tracking is off."""
    if value and value != FROM_ENV:
        return value
    env = os.environ.get(ENV_URI)
    if env:
        return env
    return "sqlite:///mlflow.db" if value == FROM_ENV else None


def enabled(args) -> bool:
    return tracking_uri(getattr(args, "mlflow", None)) is not None


CONNECT_SECONDS = 10.0  # FACEAGE_MLFLOW_TIMEOUT: how long a tracking server has to answer at the start


def without_credentials(uri: str) -> str:
    """An http(s) tracking URI with its user:password moved into MLFLOW_TRACKING_USERNAME/PASSWORD (which
    MLflow sends as basic auth): MLflow prints and stores its tracking URI ("View run ... at: URI"), so a
    credential must never be part of it. Other URIs (sqlite:, a database's) are returned as they are."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def check_reachable(uri: str, shown: str) -> None:
    """A tracking server that does not answer fails now, in one line, within FACEAGE_MLFLOW_TIMEOUT seconds
    (default 10), not after MLflow's own retries (minutes) with a traceback. Any HTTP answer counts."""
    import urllib.error
    import urllib.request

    from shell.cli import redact
    from shell.errors import UserError

    seconds = float(os.environ.get("FACEAGE_MLFLOW_TIMEOUT", CONNECT_SECONDS))
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=seconds).close()
    except urllib.error.HTTPError:
        pass  # it answered (an auth proxy, a server without /health): reachable
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"--mlflow {redact(shown)}: the tracking server did not answer within {seconds:g} s "
                        f"({redact(reason)}); start it, fix the URI, or leave tracking off (no --mlflow, "
                        f"{ENV_URI} unset)") from None


def _mlflow(args):
    from shell.errors import UserError

    try:
        import mlflow
    except ImportError:
        raise UserError("--mlflow / MLFLOW_TRACKING_URI: mlflow is not installed (pip install 'faceage[mlflow]', "
                        "or make install)") from None
    given = tracking_uri(getattr(args, "mlflow", None))
    uri = without_credentials(given)
    if uri.startswith(("http://", "https://")):
        # every later call bounded too: a server that goes away mid-run fails in about a minute, not four
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        check_reachable(uri, given)
    before = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment (for its own subprocesses): a job run in-process (the Python
    # API, a notebook, the tests) must not turn tracking on, into its store, for every job after it
    if before is None:
        os.environ.pop(ENV_URI, None)
    else:
        os.environ[ENV_URI] = before
    return mlflow


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _kept_going(method):
    """A tracking call that fails mid-run (the server went away, a full artifact store) costs the tracking,
    not the run: one warning line (redacted), then tracking is off for the rest of the run."""
    import functools

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self.on:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow's, the store's or the network's error types
            from shell.cli import log, redact

            self.on = False
            log.warning(f"tracking: {method.__name__} failed ({type(e).__name__}: {redact(_first_line(e))}); the "
                        f"run goes on without MLflow tracking")
            return None
    return call


class Run:
    """One MLflow run, or nothing at all when tracking is off (every method is then a no-op)."""

    def __init__(self, args, run_name: str, tags: Optional[dict] = None, parent_run_id: Optional[str] = None,
                 run_id: Optional[str] = None, active: bool = True):
        self.on = active and enabled(args)
        self.run_id = None
        if not self.on:
            return
        self.mlflow = _mlflow(args)
        self.client = self.mlflow.MlflowClient()
        if run_id is None:
            from shell.cli import redact
            from shell.errors import UserError

            try:
                experiment = self.mlflow.set_experiment(getattr(args, "mlflow_experiment", DEFAULT_EXPERIMENT))
                all_tags = {"faceage.stage": run_name.split("-")[0], **(tags or {})}
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = self.client.create_run(experiment.experiment_id, run_name=run_name, tags=all_tags)
            except Exception as e:  # noqa: BLE001 - MLflow's, the store's or the network's error types
                raise UserError(f"--mlflow {redact(tracking_uri(getattr(args, 'mlflow', None)))}: cannot start a "
                                f"run ({type(e).__name__}: {redact(_first_line(e))})") from None
            run_id = run.info.run_id
        self.run_id = run_id

    @_kept_going
    def log_params(self, params: dict) -> None:
        if self.on:
            from mlflow.entities import Param

            from shell.cli import redact

            plain = [Param(k, redact(v)[:500]) for k, v in sorted(params.items()) if v is not None]
            for start in range(0, len(plain), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=plain[start:start + 100])

    @_kept_going
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if self.on:
            import math
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
            if rows:
                self.client.log_batch(self.run_id, metrics=rows)

    @_kept_going
    def set_tags(self, tags: dict) -> None:
        if self.on:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    @_kept_going
    def log_artifacts(self, folder: str, path: Optional[str] = None) -> None:
        if self.on:
            self.client.log_artifacts(self.run_id, folder, path)

    @_kept_going
    def log_artifact(self, file: str, path: Optional[str] = None) -> None:
        if self.on:
            self.client.log_artifact(self.run_id, file, path)

    @_kept_going
    def log_bundle(self, bundle_path: str, register: Optional[str] = None) -> Optional[str]:
        """The bundle as a pyfunc model of this run (registered as `register` when given); its model URI."""
        if not self.on:
            return None
        import schemas
        import shell
        import trainer
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

        code = [os.path.dirname(package.__file__) for package in (trainer, schemas, shell)]  # what trainer imports
        # image: binary, so `mlflow models serve` decodes the base64 strings of a JSON request into bytes
        # params: MLflow drops any param the signature does not declare; tta None = the calibration's mode
        signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema([ColSpec("double")]),
                                   params=ParamSchema([ParamSpec("tta", "string", None)]))
        with self.mlflow.start_run(run_id=self.run_id):
            info = self.mlflow.pyfunc.log_model(
                name=PYFUNC_NAME, python_model=os.path.join(os.path.dirname(__file__), "pyfunc_model.py"),
                artifacts={"bundle": bundle_path}, code_paths=code, registered_model_name=register,
                signature=signature, pip_requirements=["torch", "torchvision", "numpy", "pillow", "pandas"])
        return info.model_uri

    @_kept_going
    def end(self, status: str = "FINISHED") -> None:
        if self.on:
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, trace) -> None:
        """The run's end status from how the block ended: FINISHED, KILLED (pruned or interrupted), FAILED."""
        pruned = kind is not None and kind.__name__ in ("TrialPruned", "KeyboardInterrupt")
        self.end("FINISHED" if kind is None else "KILLED" if pruned else "FAILED")
