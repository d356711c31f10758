"""The faces table, the rejects table and the run manifest: the contract between stages."""
from __future__ import annotations

from schemas.fields import Field

SPLITS = ("train", "val", "test")
# Every age a label holds and a model may predict, in years (the distribution head's bins are 0..MAX_AGE;
# evaluate leaves a predicted age outside this range out of the metrics and counts it).
MIN_AGE, MAX_AGE = 0, 120
# The age groups every report slices true ages by: evaluate's age_group, the model card, the trainer's bias
# summary and the age map's strength (lower bounds: 0-2, 3-9, 10-19, ..., 60-69, 70+).
AGE_GROUP_BOUNDS = (0, 3, 10, 20, 30, 40, 50, 60, 70)


def age_group_names() -> list:
    """["0-2", "3-9", "10-19", ..., "60-69", "70+"]: AGE_GROUP_BOUNDS' groups by name."""
    return [f"{low}-{high - 1}" for low, high in zip(AGE_GROUP_BOUNDS, AGE_GROUP_BOUNDS[1:])] + \
        [f"{AGE_GROUP_BOUNDS[-1]}+"]

FACES = (
    Field("face_id", "string", doc="stable id: content hash and face index"),
    Field("source_path", "string", doc="URI of the input image"),
    Field("content_sha256", "string", doc="sha256 of the input file's bytes"),
    Field("image", "binary", doc="encoded crop (JPEG), size x size pixels"),
    Field("image_size", "int32", doc="crop side in pixels"),
    Field("age", "int32", doc=f"age in years, {MIN_AGE}..{MAX_AGE}"),
    Field("gender", "int32", nullable=True, doc="0 male, 1 female (UTKFace coding)"),
    Field("race", "int32", nullable=True, doc="0 White, 1 Black, 2 Asian, 3 Indian, 4 Others"),
    Field("subject_id", "string", nullable=True, doc="person id when the dataset knows it"),
    Field("bbox", "float32_list", length=4, doc="x0, y0, x1, y1 in upright source pixels"),
    Field("landmarks", "float32_list", nullable=True, length=10,
          doc="right eye, left eye, nose, right mouth, left mouth as x, y pairs; null without detector landmarks"),
    Field("det_score", "float32", nullable=True, doc="detector confidence; null for --detector none"),
    Field("n_faces", "int32", doc="faces the detector found in the source image"),
    Field("source_width", "int32", doc="upright source width"),
    Field("source_height", "int32", doc="upright source height"),
    Field("split", "string", doc="train | val | test"),
    Field("dataset", "string", doc="label source: utkface | fgnet | manifest"),
    Field("prepare_run_id", "string", doc="the prepare run that wrote the row"),
)

# Every input file that did not become a face gets one row here, with one of REASONS.
REASONS = {
    "not_an_image": "the bytes are not an image format Pillow reads",
    "empty_file": "zero bytes",
    "corrupt": "the image header reads but its data does not (truncated or damaged)",
    "too_large": "over --max-pixels or --max-file-bytes",
    "unsupported_mode": "a pixel format with no RGB conversion",
    "unsupported_extension": "file name does not end in an image extension",
    "hidden_file": "a name starting with '.' or '_' (hidden or metadata), which Spark does not read",
    "no_face": "the detector found no face",
    "face_too_small": "the largest face is smaller than --min-face pixels",
    "bad_label": "no usable age in the file name or manifest",
    "duplicate": "byte-identical to another input or to a row already in the table",
    "unreadable": "listed but could not be read",
    "link_loop": "a link to a folder already listed (a loop, or a second path to it): not entered again",
}

REJECTS = (
    Field("source_path", "string"),
    Field("reason", "string", doc="one of REASONS"),
    Field("detail", "string", doc="what exactly was wrong, for a person"),
    Field("size_bytes", "int64", nullable=True),
    Field("content_sha256", "string", nullable=True),
    Field("dataset", "string"),
    Field("prepare_run_id", "string"),
)

# Keys of the JSON run manifest, written last: its presence means the run finished.
MANIFEST_KEYS = (
    "run_id", "status", "started_at", "finished_at", "argv", "settings", "inputs", "output",
    "format", "mode", "counts", "rejects_by_reason", "splits", "age_histogram", "timings_s",
    "table_versions", "spark", "versions",
)

# spark_jobs/score.py: one row per face found, and one row (face_index null) per photo with no face
# or that could not be read, so photos in = photos with faces + photos without + unreadable.
PREDICTIONS = (
    Field("source_path", "string", doc="URI of the scored photo (or of the faces-table row's source)"),
    Field("face_index", "int32", nullable=True, doc="0 = the largest face; null when no face was scored"),
    Field("face_id", "string", nullable=True, doc="content hash + face index: prepare's face_id for face 0"),
    Field("bbox", "float32_list", nullable=True, length=4, doc="x0, y0, x1, y1 in upright source pixels"),
    Field("det_score", "float32", nullable=True, doc="detector confidence"),
    Field("n_faces", "int32", nullable=True, doc="faces the detector found in the photo"),
    Field("predicted_age", "float32", nullable=True, doc="expected age in years"),
    Field("uncertainty", "float32", nullable=True, doc="std of the predicted age distribution (NaN: regression)"),
    Field("status", "string", doc="ok, or the reason there is no prediction (a REASONS key)"),
    Field("detail", "string", nullable=True, doc="what exactly was wrong, for a person"),
    Field("model_id", "string", doc="sha256 prefix of the model bundle file"),
    Field("data_version", "int64", nullable=True, doc="Delta version of the model's training data"),
    Field("input_version", "int64", nullable=True, doc="Delta version of a scored faces table"),
    Field("score_run_id", "string"),
)
