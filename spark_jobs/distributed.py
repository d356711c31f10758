"""spark-submit spark_jobs/distributed.py train|tune: the trainer's jobs spread over a Spark cluster.

    spark-submit spark_jobs/distributed.py train --num-processes 4 [--local-mode auto] --data ... --epochs 30
    spark-submit spark_jobs/distributed.py tune --workers 8 --storage postgresql://... --data ... --n-trials 40

`train`: the same `python -m trainer.train` run in --num-processes ranks through pyspark's TorchDistributor
(gloo on CPU, nccl on CUDA; each rank reads its own shard, only rank 0 writes). Every flag after ours is a
trainer.train flag. `tune`: --workers Spark tasks, each a trainer.tune worker on one shared Optuna storage
(on a cluster, a database every executor reaches). Every other flag is a trainer.tune flag.

Spark lives here, on the spark_jobs side: trainer/ never imports spark_jobs (the arrow points one way).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional


from shell.cli import entry_points, log, Parser, positive_int
from shell.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("distributed", prog="spark-submit spark_jobs/distributed.py", description=__doc__.splitlines()[0],
               epilog="\n".join(__doc__.splitlines()[1:]), allow_abbrev=False)
    p.add_argument("job", choices=("train", "tune"), help="train: TorchDistributor ranks; tune: Spark-task workers")
    p.add_argument("--num-processes", type=positive_int, default=2, help="train: processes (ranks)")
    p.add_argument("--local-mode", default="auto", choices=("auto", "true", "false"),
                   help="train: TorchDistributor local_mode, processes on the driver (auto: when the master is "
                        "local)")
    return p


def train_on_spark(num_processes: int, local_mode: str, train_argv: List[str]) -> dict:
    """trainer.train's run in `num_processes` ranks via TorchDistributor; rank 0's summary."""
    import torch
    from pyspark.ml.torch.distributor import TorchDistributor

    from spark_jobs.session import configured_master, get_spark
    from trainer import train

    parser = train.get_args_parser()
    train_argv = absolute_paths(parser, train_argv)  # ranks run in executors' work folders, not this one
    args = parser.parse_args(train_argv)  # flags checked here, once, before any rank starts
    train.apply_params_file(args, parser, train_argv)
    train.check_output(args, main_rank=False)  # checked here; rank 0 takes the folder's lock
    local = local_mode == "true" or (local_mode == "auto" and configured_master().startswith("local"))
    get_spark("faceage-train", None if local else ship_code_to_subprocesses())
    if local:  # the ranks are processes on this machine, started from this checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p])
    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    log.info(f"train: TorchDistributor with {num_processes} processes (local_mode={local}, gpu={use_gpu})")
    said = _RankLines()
    try:
        with said.watching():
            return TorchDistributor(num_processes=num_processes, local_mode=local, use_gpu=use_gpu).run(
                train.distributed_entry, list(train_argv))
    except Exception as e:  # noqa: BLE001 - a rank's own error stays in its log; here it is one line
        if "TorchDistributor failed" not in str(e) and "barrier" not in str(e):
            raise
        where = "this machine's output above" if local else (
            "each executor's stderr (the Spark UI's Executors tab; on a standalone worker, "
            "<work dir>/app-*/<executor>/stderr)")
        errors = rank_errors("\n".join(said.lines) + "\n" + str(e))
        if errors:
            raise UserError(f"a training rank failed: {'; '.join(errors)} (the rest of its output is in {where})") \
                from None
        raise UserError(f"a training rank failed ({str(e).splitlines()[0][:200]}); its error is in {where}") \
            from None


class _RankLines:
    """The ranks' RANK_ERROR lines as they pass through this driver: TorchDistributor writes the ranks' output
    to the driver's stdout (local mode) or its log server writes what the executors stream to the driver's
    stderr (a cluster). Everything is passed on unchanged."""

    def __init__(self):
        from trainer.train import RANK_ERROR

        self.marker, self.lines = RANK_ERROR, []

    def tee(self, stream):
        watcher = self

        class Tee:
            def write(self, text):
                if watcher.marker in text:
                    watcher.lines.extend(line for line in text.splitlines() if watcher.marker in line)
                return stream.write(text)

            def __getattr__(self, name):
                return getattr(stream, name)
        return Tee()

    @contextlib.contextmanager
    def watching(self):
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.tee(out), self.tee(err)
        try:
            yield self
        finally:
            sys.stdout, sys.stderr = out, err


def rank_errors(text: str) -> List[str]:
    """The ranks' own last lines (trainer.train.RANK_ERROR) in `text`: 'rank 1: TrainError: ...', one per
    rank, in rank order."""
    from trainer.train import RANK_ERROR

    found = {}
    for line in text.replace("\\n", "\n").splitlines():
        if RANK_ERROR in line:
            said = line.split(RANK_ERROR, 1)[1].strip()
            found.setdefault(said.split(":", 1)[0], said)
    return [found[k] for k in sorted(found)]


def absolute_paths(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """`argv` with every local value of a path flag (type path_arg) made absolute: a relative path means the
    driver's folder, and the ranks run elsewhere. Remote URIs and other flags are left as given."""
    from shell import uri
    from shell.cli import path_arg

    flags = {o for a in parser._actions if a.type is path_arg for o in a.option_strings}

    def absolute(value: str) -> str:
        return value if uri.is_remote(value) or value.startswith("file:") else os.path.abspath(value)

    out, take = [], False
    for word in argv:
        if take:
            out.append(absolute(word))
            take = False
        elif word in flags:
            out.append(word)
            take = True
        elif "=" in word and word.split("=", 1)[0] in flags:
            flag, value = word.split("=", 1)
            out.append(f"{flag}={absolute(value)}")
        else:
            out.append(word)
    return out


def ship_code_to_subprocesses() -> dict:
    """Settings that put the --py-files archives on the executors' PYTHONPATH. Python workers import them
    from their own work folder already, but TorchDistributor starts each rank as a torchrun child process,
    which sees only the environment: without this it would import the project from wherever the executor's
    Python finds it (on this machine, the driver's checkout), or not at all."""
    from spark_jobs.session import submitted_conf

    given = submitted_conf()
    shipped = [p for p in (given.get("spark.submit.pyFiles", "") if given is not None else "").split(",") if p]
    names = [os.path.basename(p.split("#")[-1]) for p in shipped]
    if not names:  # e.g. the Docker image, whose nodes have the project installed
        log.info("train: no --py-files given: the ranks import the project installed on each node (an image); "
                 "elsewhere pass --py-files dist/faceage_code.zip (make dist)")
        return {}
    return {"spark.executorEnv.PYTHONPATH": os.pathsep.join(names)}  # relative: each executor's work folder


def _tune_task(args, worker: int) -> dict:
    import contextlib
    import io

    from trainer import tune

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tune.run_worker(args, worker)
    return {"worker": worker, "pid": os.getpid(), "log_tail": out.getvalue()[-2000:]}


def spark_workers(args) -> List[dict]:
    """trainer.tune's launcher: --workers Spark tasks, each a tune worker on the shared storage."""
    from shell import uri
    from spark_jobs.session import get_spark
    from trainer import tune

    url = tune.storage_url(args)
    spark = get_spark("faceage-tune")
    if url.startswith("sqlite") and not spark.sparkContext.master.startswith("local"):
        raise UserError("tune on a cluster needs a database every executor reaches (e.g. --storage "
                        "postgresql://...), not a local SQLite file")
    k = max(1, args.workers)
    data = args.data if uri.is_remote(args.data) else uri.local_path(args.data)
    output = args.output if uri.is_remote(args.output) else uri.local_path(args.output)
    task_args = argparse.Namespace(**{**vars(args), "data": data, "output": output})
    return spark.sparkContext.parallelize(range(k), k).map(lambda w: _tune_task(task_args, w)).collect()


def _job(argv: Optional[List[str]]) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = get_args_parser().parse_known_args(argv)
    if args.job == "train":
        summary = train_on_spark(args.num_processes, args.local_mode, rest)
        log.info(f"train: distributed run finished: test MAE {summary['test_mae']:.2f} "
                 f"({summary['world_size']} ranks); bundle {summary['bundle']}; rank 0 ran {summary['code_file']}")
        return 0
    from trainer import tune

    tune_args = tune.get_args_parser().parse_args(rest)
    tune.report_line(tune.run(tune_args, launch=spark_workers))
    return 0


main, console_main = entry_points("distributed", _job)

if __name__ == "__main__":
    sys.exit(main())
