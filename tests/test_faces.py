"""The detect/align/crop function on generated files: every awkward input a folder can hold."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import encode, synthetic_face, synthetic_photo
from schemas.crop import CropSettings
from photos.faces import (Reject, crop_faces, crop_transform, decode_upright,
                              similarity_transform, template_points)

SETTINGS = CropSettings(size=64)


def crop_image(raw: bytes, settings: CropSettings = SETTINGS):
    crops = crop_faces(raw, settings)
    assert len(crops) == 1
    im = Image.open(io.BytesIO(crops[0].image))
    assert im.size == (settings.size, settings.size) and im.mode == "RGB"
    return crops[0], np.asarray(im, dtype=np.float64)


def reject_reason(raw: bytes, settings: CropSettings = SETTINGS) -> Reject:
    with pytest.raises(Reject) as info:
        crop_faces(raw, settings)
    return info.value


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot) and np.allclose(m[:, 2], shift)


def test_landmarks_land_on_the_template():
    photo, _ = synthetic_photo(30, seed=1)
    crop, _ = crop_image(encode(photo), CropSettings(size=128))
    points = np.array(crop.landmarks).reshape(5, 2)
    m = crop_transform(points, 128, CropSettings.margin)
    mapped = points @ m[:, :2].T + m[:, 2]
    # a similarity fit leaves the residual of a real face's shape, a few pixels at most
    assert np.abs(mapped - template_points(128, CropSettings.margin)).max() < 6
    assert points[0, 1] < points[3, 1] and points[0, 0] < points[1, 0]  # eyes above mouth, right eye left


def test_crop_is_centred_on_the_pasted_face():
    photo, (cx, cy, side) = synthetic_photo(50, seed=2, scale=0.8)
    crop, _ = crop_image(encode(photo))
    x0, y0, x1, y1 = crop.bbox
    assert abs((x0 + x1) / 2 - cx) < 0.15 * side and abs((y0 + y1) / 2 - cy) < 0.2 * side
    assert crop.n_faces == 1 and crop.det_score >= SETTINGS.min_score
    assert (crop.source_width, crop.source_height) == (640, 480)


def test_exif_rotated_photo_comes_out_upright():
    photo, _ = synthetic_photo(40, seed=4)
    _, upright = crop_image(encode(photo, quality=95))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # the sensor's sideways pixels
    crop, rotated = crop_image(encode(stored, quality=95, exif=exif.tobytes()))
    assert (crop.source_width, crop.source_height) == (640, 480)
    assert np.abs(rotated - upright).mean() < 12  # same face, same way up (JPEG noise aside)
    assert np.abs(rotated - np.rot90(upright, 1)).mean() > 2 * np.abs(rotated - upright).mean()


@pytest.mark.parametrize("convert", [
    pytest.param(lambda im: encode(im.convert("CMYK"), "JPEG", quality=95), id="cmyk-jpeg"),
    pytest.param(lambda im: encode(im.convert("L"), "JPEG", quality=95), id="grayscale-jpeg"),
    pytest.param(lambda im: encode(im.convert("RGBA"), "PNG"), id="rgba-png"),
    pytest.param(lambda im: encode(im.quantize(256), "PNG"), id="palette-png"),
    pytest.param(lambda im: encode(Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257), "I;16"), "PNG"),
                 id="16bit-png"),
    pytest.param(lambda im: encode(im, "WEBP", quality=90), id="webp"),
    pytest.param(lambda im: encode(im, "BMP"), id="bmp"),
])
def test_pixel_formats_become_rgb_faces(convert):
    photo, _ = synthetic_photo(25, seed=5)
    raw = convert(photo)
    crop, pixels = crop_image(raw)
    assert pixels.std() > 10  # a real picture, not a blank converted from a mode gone wrong
    assert crop.n_faces == 1


def test_sixteen_bit_keeps_its_dynamic_range():
    gray = np.asarray(synthetic_photo(25, seed=5)[0].convert("L"), np.uint16) * 257
    im = decode_upright(encode(Image.fromarray(gray, "I;16"), "PNG"), 10**8)
    assert im.mode == "RGB"
    assert abs(np.asarray(im)[..., 0].astype(int) - gray // 257).max() <= 1


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty_file"),
    (b"this is a text file, not a JPEG\n" * 3, "not_an_image"),
])
def test_not_images(raw, reason):
    assert reject_reason(raw).reason == reason


def test_truncated_jpeg_is_corrupt():
    raw = encode(synthetic_photo(30, seed=6)[0], quality=90)
    rejected = reject_reason(raw[: len(raw) // 2])
    assert rejected.reason == "corrupt" and "truncated" in rejected.detail


def test_decompression_bomb_is_refused_before_decoding():
    raw = encode(Image.new("L", (9000, 9000)), "PNG")  # 81 Mpx of zeros: a few hundred KB on disk
    assert len(raw) < 2_000_000
    rejected = reject_reason(raw)
    assert rejected.reason == "too_large" and "9000x9000" in rejected.detail


def test_huge_photo_is_downscaled_for_detection_and_cropped_from_full_resolution():
    face = synthetic_face(60, seed=7, size=400)
    canvas = Image.new("RGB", (6000, 4500), (90, 120, 150))
    canvas.paste(face.resize((1600, 1600)), (3000, 1500))
    crop, pixels = crop_image(encode(canvas, quality=90), CropSettings(size=128))
    x0, y0, x1, y1 = crop.bbox
    assert 3000 - 200 < x0 < x1 < 4600 + 200 and 1500 - 300 < y0 < y1 < 3100 + 200
    assert pixels.std() > 10


def test_no_face():
    rng = np.random.default_rng(8)
    scene = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).resize((640, 480))
    assert reject_reason(encode(scene)).reason == "no_face"


def test_several_faces_keep_the_largest():
    canvas = Image.new("RGB", (800, 480), (120, 140, 160))
    canvas.paste(synthetic_face(30, seed=9, size=160), (40, 200))
    canvas.paste(synthetic_face(70, seed=10, size=300), (420, 90))
    crop, _ = crop_image(encode(canvas, quality=95))
    assert crop.n_faces == 2
    assert crop.bbox[0] > 400  # the big face on the right
    every = crop_faces(encode(canvas, quality=95), SETTINGS, all_faces=True)
    assert [c.face_index for c in every] == [0, 1] and every[1].bbox[0] < 400


def test_face_too_small():
    photo, _ = synthetic_photo(30, seed=11, scale=0.6)
    rejected = reject_reason(encode(photo), CropSettings(size=64, min_face=400))
    assert rejected.reason == "face_too_small" and "--min-face 400" in rejected.detail


def test_hog_detector_crops_the_same_face():
    pytest.importorskip("dlib")
    photo, (cx, cy, side) = synthetic_photo(35, seed=12, scale=1.2)
    crop, _ = crop_image(encode(photo), CropSettings(size=64, detector="hog", min_score=0.3))
    x0, y0, x1, y1 = crop.bbox
    assert crop.landmarks is None
    assert abs((x0 + x1) / 2 - cx) < 0.2 * side


def test_detector_none_resizes_prealigned_crops():
    face = synthetic_face(20, seed=13, size=200)
    crop, pixels = crop_image(encode(face.crop((0, 0, 200, 180))), CropSettings(size=48, detector="none"))
    assert crop.det_score is None and crop.landmarks is None and crop.bbox == [10.0, 0.0, 190.0, 180.0]


def test_a_reject_reason_is_one_the_rejects_table_defines():
    from schemas.tables import REASONS

    assert Reject("no_face", "none found").reason in REASONS
    with pytest.raises(ValueError, match="not one of schemas.tables.REASONS"):
        Reject("no_faec", "a typo in a code path")
