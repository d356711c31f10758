"""The MLflow pyfunc model of a faceage bundle (logged "from code" by trainer.tracking.Run.log_bundle).

Input: a DataFrame with an `image` column of face crops as a faces table holds them (JPEG/PNG bytes,
aligned by spark_jobs/prepare.py). Output: the predicted age per row (float), the same numbers
spark_jobs/score.py writes for a faces table (the same Predictor, decoding and batching). Use it from
pandas (`mlflow.pyfunc.load_model(uri).predict(df)`) or Spark
(`mlflow.pyfunc.spark_udf(spark, uri, result_type="double")` over `struct("image")`).
"""
from __future__ import annotations

import mlflow
import numpy as np


class FaceAgeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainer.bundle import Predictor

        self.predictor = Predictor(context.artifacts["bundle"], device="cpu")

    def predict(self, context, model_input, params=None):
        from trainer.runtime import decode_image

        column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        pixels = [decode_image(bytes(raw), self.predictor.size) for raw in column]
        if not pixels:
            return np.zeros(0, np.float64)
        ages, _ = self.predictor.predict(np.stack(pixels), tta=(params or {}).get("tta"))
        return ages.astype(np.float64)


mlflow.models.set_model(FaceAgeModel())
