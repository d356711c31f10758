"""One field list per table; Spark, pyarrow and Petastorm schemas are derived from it.

A `Field` names a column once with a small, storage-neutral type vocabulary. The
`*_schema` functions turn a tuple of fields into the type system each stage needs, so a
column added here shows up everywhere at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# Storage-neutral type names -> (pyarrow factory, Spark type name, numpy dtype name).
_KINDS = ("string", "binary", "int32", "int64", "float32", "float64", "bool", "float32_list")


@dataclass(frozen=True)
class Field:
    """A column: `kind` is one of _KINDS; `length` is the fixed length of a list column."""

    name: str
    kind: str
    nullable: bool = False
    doc: str = ""
    length: Optional[int] = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}; use one of {_KINDS}")
        if (self.kind == "float32_list") != (self.length is not None):
            raise ValueError(f"field {self.name!r}: a length goes with kind float32_list only")


def arrow_schema(fields: Sequence[Field]):
    """pyarrow.Schema for `fields` (list columns as list<float32>)."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "binary": pa.binary(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "float32": pa.float32(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "float32_list": pa.list_(pa.field("element", pa.float32(), nullable=False)),  # as Spark writes it
    }
    return pa.schema([pa.field(f.name, types[f.kind], nullable=f.nullable) for f in fields])


def spark_schema(fields: Sequence[Field]):
    """pyspark StructType for `fields`."""
    from pyspark.sql import types as T

    types = {
        "string": T.StringType(),
        "binary": T.BinaryType(),
        "int32": T.IntegerType(),
        "int64": T.LongType(),
        "float32": T.FloatType(),
        "float64": T.DoubleType(),
        "bool": T.BooleanType(),
        "float32_list": T.ArrayType(T.FloatType(), containsNull=False),
    }
    return T.StructType([T.StructField(f.name, types[f.kind], f.nullable) for f in fields])


def unischema(name: str, fields: Sequence[Field]):
    """petastorm Unischema for `fields` (what make_batch_reader yields per column)."""
    import numpy as np
    from petastorm.unischema import Unischema, UnischemaField

    dtypes = {
        "string": np.str_,
        "binary": np.bytes_,
        "int32": np.int32,
        "int64": np.int64,
        "float32": np.float32,
        "float64": np.float64,
        "bool": np.bool_,
        "float32_list": np.float32,
    }
    return Unischema(
        name,
        [
            UnischemaField(f.name, dtypes[f.kind], (f.length,) if f.length else (), None, f.nullable)
            for f in fields
        ],
    )
