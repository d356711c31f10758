"""faceage: the ages of faces in photos, from Python.

    from faceage import Estimator

    est = Estimator.load("runs/train/model.pt")      # a bundle (trainer.train) or an .onnx export (trainer.export)
    for face in est.predict("photo.jpg"):             # a path, a folder, bytes, a PIL image, an HxWx3 uint8 array,
        print(face.age, face.uncertainty, face.box)   # or a list of them
    est.info()                                        # the model: id, head, input size, data, crop settings

Every face is found, aligned and cropped exactly as spark_jobs/score.py and spark_jobs/predict.py do (the one
path: photos.faces.crop_faces framed like the model's training crops, the model's own preprocessing), so the
numbers are the CLI's. A photo without a usable face gives one Face with its status (no_face, not_an_image,
...) and no age. Importing faceage starts no Spark and no JVM. The HTTP service over the same Estimator:
python -m faceage.serve (faceage/serve.py).
"""
from spark_jobs.predict import Estimator, Face

__all__ = ["Estimator", "Face"]
