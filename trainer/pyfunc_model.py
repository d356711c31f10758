"""The MLflow pyfunc model of a faceage bundle (logged "from code" by trainer.tracking.Run.log_bundle).

Input: a DataFrame with an `image` column of face crops as a faces table holds them (JPEG/PNG bytes,
aligned by spark_jobs/prepare.py). Output: the predicted age per row (float), the same numbers
spark_jobs/score.py writes for a faces table (the same Predictor, decoding and batching). Use it from
pandas (`mlflow.pyfunc.load_model(uri).predict(df)`) or Spark
(`mlflow.pyfunc.spark_udf(spark, uri, result_type="double")` over `struct("image")`).
The param `tta` picks the test-time augmentation (trainer.runtime.TTA_HELP); left out, the mode the bundle's
calibration was fitted under. Another mode runs as asked, with one warning line per mode (runtime.announce_tta).
"""
from __future__ import annotations

import mlflow
import numpy as np


class FaceAgeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainer.bundle import Predictor

        self.predictor = Predictor(context.artifacts["bundle"], device="cpu")
        self.warned = set()  # the asked TTA modes already warned about (once each, not every call)

    def predict(self, context, model_input, params=None):
        from trainer.runtime import announce_tta, decode_image

        column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        pixels = [decode_image(bytes(raw), self.predictor.size) for raw in column]
        if not pixels:
            return np.zeros(0, np.float64)
        tta = announce_tta(self.predictor.bundle, (params or {}).get("tta"), "pyfunc", self.warned)
        ages, _ = self.predictor.predict(np.stack(pixels), tta=tta)
        return ages.astype(np.float64)


mlflow.models.set_model(FaceAgeModel())
