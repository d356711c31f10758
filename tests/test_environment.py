"""Proof that the pinned stack installs and works together (not just imports)."""
import importlib.metadata as md

import numpy as np
import pytest

from schemas import fields as schema_fields
from schemas.tables import FACES

PINS = {"torch": "2.14.1", "torchvision": "0.29.1", "pyspark": "4.0.5", "delta-spark": "4.0.1",
        "pyarrow": "14.0.2", "numpy": "1.26.4", "pandas": "2.3.3", "petastorm": "0.13.1", "optuna": "5.0.0"}


@pytest.mark.parametrize("package, version", sorted(PINS.items()))
def test_pinned_versions(package, version):
    assert md.version(package) == version


def test_petastorm_reads_a_real_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from petastorm import make_batch_reader

    table = pa.table({"age": pa.array(np.arange(50, dtype=np.int32)), "image": pa.array([b"x" * 7] * 50)})
    pq.write_table(table, tmp_path / "part-0.parquet")
    seen = []
    with make_batch_reader("file://" + str(tmp_path), num_epochs=1, workers_count=1) as reader:
        for batch in reader:
            seen.extend(batch.age.tolist())
    assert sorted(seen) == list(range(50))


def test_torch_and_torchvision_build_resnet18():
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=1)
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 1)


def test_optuna_runs_a_study():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2, n_trials=15)
    assert abs(study.best_params["x"] - 1) < 1.5


def test_yuface_finds_a_drawn_face():
    from conftest import synthetic_photo
    from photos.faces import get_detector

    photo, _ = synthetic_photo(30, seed=1)
    found = get_detector("yunet")(np.asarray(photo), 0.5)
    assert len(found) == 1


def test_delta_write_through_spark_reads_back_with_deltalake(spark, tmp_path):
    from deltalake import DeltaTable

    from spark_jobs.session import delta_available

    assert delta_available(spark)
    path = str(tmp_path / "t")
    spark.range(10).write.format("delta").save(path)
    spark.range(10, 15).write.format("delta").mode("append").save(path)
    assert DeltaTable(path).version() == 1
    assert DeltaTable(path, version=0).to_pyarrow_table().num_rows == 10
    assert spark.read.format("delta").load(path).count() == 15


def test_schemas_agree_across_spark_arrow_and_petastorm(spark, tmp_path):
    arrow = schema_fields.arrow_schema(FACES)
    sparks = schema_fields.spark_schema(FACES)
    uni = schema_fields.unischema("Faces", FACES)
    assert arrow.names == [f.name for f in sparks.fields] == list(uni.fields.keys())
    assert [f.nullable for f in arrow] == [f.nullable for f in sparks.fields]
    # A Spark-written empty faces table has exactly the pyarrow schema (types and names).
    import pyarrow.parquet as pq

    spark.createDataFrame([], sparks).write.parquet(str(tmp_path / "f"))
    written = pq.read_schema(next((tmp_path / "f").glob("*.parquet")))
    assert [(f.name, str(f.type)) for f in written] == [(f.name, str(f.type)) for f in arrow]
    assert uni.fields["bbox"].shape == (4,) and uni.fields["landmarks"].nullable
