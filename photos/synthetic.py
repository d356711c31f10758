"""Built-in SYNTHETIC sample: drawn faces whose looks follow a made-up age, no real people.

Real face datasets may not be shipped, so the demo and the tests draw their own. Age changes
the drawing the way it changes real faces, loosely: children have large eyes set low in a round
head, hair greys from 40 on, wrinkles deepen. That gives training something honest to learn.
File names follow UTKFace's pattern (age_gender_race_stamp.jpg), so `--labels utkface` reads them.
"""
from __future__ import annotations

import dataclasses

import io
import os
import re
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKIN = [(255, 224, 196), (234, 192, 160), (214, 164, 128), (178, 124, 88), (150, 102, 70)]
HAIR = [(40, 28, 20), (90, 60, 30), (160, 120, 60), (20, 20, 20), (120, 50, 20)]


@dataclasses.dataclass
class _Face:
    """Where draw_face's features sit (in a 200-pixel frame, scaled by `s`) and their colours."""

    age: int
    s: float
    child: float
    cx: float
    cy: float
    head_w: float
    head_h: float
    skin: tuple
    hair: tuple


def draw_face(age: int, rng: np.random.Generator, size: int = 200, gender: int = 0,
              race: int = 0) -> Image.Image:
    """A frontal face filling most of a size x size RGB image; features depend on age."""
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 3)))
    d = ImageDraw.Draw(im)
    f = _head(d, age, rng, size / 200.0, gender, race)
    eye_y, eye_r = _eyes(d, f, rng)
    _nose_mouth_wrinkles(d, f, eye_y, eye_r)
    im = im.filter(ImageFilter.GaussianBlur(radius=0.8 * f.s))
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, float) + noise, 0, 255).astype(np.uint8))


def _head(d, age: int, rng, s: float, gender: int, race: int) -> _Face:
    """Neck and shoulders, hair behind, head, ears; the face's geometry and colours."""
    child = max(0.0, min(1.0, (16 - age) / 14))  # 1 at age 2, 0 from 16
    grey = max(0.0, min(1.0, (age - 40) / 40))  # 0 until 40, 1 at 80
    skin = np.array(SKIN[race % len(SKIN)], float) + rng.normal(0, 6, 3)
    hair = np.array(HAIR[int(rng.integers(len(HAIR)))], float) * (1 - grey) + np.array([200, 200, 200]) * grey
    skin_c, hair_c = tuple(int(v) for v in np.clip(skin, 0, 255)), tuple(int(v) for v in np.clip(hair, 0, 255))
    cx = 100 + rng.normal(0, 2)
    head_w = 62 + 6 * child + rng.normal(0, 2)
    head_h = head_w * (1.32 - 0.14 * child)
    cy = 104
    d.rectangle([s * (cx - 20), s * (cy + head_h * 0.8), s * (cx + 20), s * 200], fill=skin_c)
    d.ellipse([s * (cx - 95), s * (cy + head_h * 1.0), s * (cx + 95), s * (cy + head_h * 1.9)],
              fill=tuple(int(v) for v in rng.integers(30, 220, 3)))
    long_hair = gender == 1
    d.ellipse([s * (cx - head_w - 6), s * (cy - head_h - 8), s * (cx + head_w + 6),
               s * (cy + (head_h * 0.9 if long_hair else head_h * 0.1))], fill=hair_c)
    for side in (-1, 1):
        ex = cx + side * head_w
        d.ellipse([s * (ex - 9), s * (cy - 12), s * (ex + 9), s * (cy + 16)], fill=skin_c)
    d.ellipse([s * (cx - head_w), s * (cy - head_h), s * (cx + head_w), s * (cy + head_h)], fill=skin_c)
    d.chord([s * (cx - head_w), s * (cy - head_h - 2), s * (cx + head_w), s * (cy - head_h * 0.35)],
            180, 360, fill=hair_c)
    return _Face(age, s, child, cx, cy, head_w, head_h, skin_c, hair_c)


def _eyes(d, f: _Face, rng):
    """Eyes, brows and (from 35) crow's feet; (eye line, eye radius)."""
    s, child, cx = f.s, f.child, f.cx
    eye_y = f.cy - f.head_h * (0.12 - 0.18 * child)
    eye_dx = f.head_w * 0.42
    eye_r = 7.5 + 4.0 * child
    brow_c = tuple(int(v * 0.6) for v in f.hair)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse([s * (ex - eye_r * 1.5), s * (eye_y - eye_r), s * (ex + eye_r * 1.5), s * (eye_y + eye_r)],
                  fill=(245, 245, 245))
        iris = tuple(int(v) for v in rng.integers(30, 120, 3))
        d.ellipse([s * (ex - eye_r * 0.8), s * (eye_y - eye_r * 0.8), s * (ex + eye_r * 0.8),
                   s * (eye_y + eye_r * 0.8)], fill=iris)
        d.ellipse([s * (ex - eye_r * 0.35), s * (eye_y - eye_r * 0.35), s * (ex + eye_r * 0.35),
                   s * (eye_y + eye_r * 0.35)], fill=(10, 10, 10))
        d.line([s * (ex - eye_r * 1.7), s * (eye_y - eye_r * 1.9), s * (ex + eye_r * 1.7),
                s * (eye_y - eye_r * 2.1)], fill=brow_c, width=max(1, int(s * (4 - 2 * child))))
        if f.age > 35:  # crow's feet
            for k in range(min(3, (f.age - 30) // 15 + 1)):
                ox = ex + side * eye_r * 1.9
                d.line([s * ox, s * (eye_y - 3 + 4 * k), s * (ox + side * 7), s * (eye_y - 6 + 6 * k)],
                       fill=tuple(int(v * 0.75) for v in f.skin), width=max(1, int(s)))
    return eye_y, eye_r


def _nose_mouth_wrinkles(d, f: _Face, eye_y: float, eye_r: float) -> None:
    s, child, cx, head_w = f.s, f.child, f.cx, f.head_w
    nose_y = eye_y + f.head_h * 0.38
    d.polygon([(s * cx, s * (eye_y + 6)), (s * (cx - 8 + 3 * child), s * nose_y),
               (s * (cx + 8 - 3 * child), s * nose_y)], fill=tuple(int(v * 0.85) for v in f.skin))
    mouth_y = nose_y + f.head_h * 0.25
    mouth_w = head_w * (0.42 - 0.1 * child)
    d.chord([s * (cx - mouth_w), s * (mouth_y - 8), s * (cx + mouth_w), s * (mouth_y + 8)], 0, 180,
            fill=(150, 50, 60))
    # forehead wrinkles from 30 on, more and darker with age
    n_lines = max(0, (f.age - 25) // 12)
    for k in range(min(n_lines, 5)):
        y = eye_y - eye_r * 3 - 5 * k
        d.arc([s * (cx - head_w * 0.55), s * (y - 4), s * (cx + head_w * 0.55), s * (y + 4)], 200, 340,
              fill=tuple(int(v * (0.8 - 0.03 * k)) for v in f.skin), width=max(1, int(s)))


def paste_on_background(face: Image.Image, rng: np.random.Generator, canvas: Tuple[int, int] = (640, 480),
                        scale: Optional[float] = None) -> Tuple[Image.Image, Tuple[float, float, float]]:
    """Paste `face` at a random position and scale on a textured canvas; returns (image, (cx, cy, side))."""
    w, h = canvas
    scale = scale if scale is not None else float(rng.uniform(0.6, 1.4))
    side = int(min(face.size[0] * scale, min(w, h) * 0.9))
    face = face.resize((side, side), Image.Resampling.BICUBIC)
    gx = np.linspace(0, 1, w)[None, :, None]
    gy = np.linspace(0, 1, h)[:, None, None]
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    bg = c0 * (1 - gx) * (1 - gy) + c1 * gx * gy + rng.normal(0, 12, (h, w, 3))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    x = int(rng.integers(0, w - side + 1))
    y = int(rng.integers(0, h - side + 1))
    im.paste(face, (x, y))
    return im, (x + side / 2.0, y + side / 2.0, float(side))


def jpeg_bytes(im: Image.Image, quality: int = 92, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


DEMO_NAME = re.compile(r"^\d+_\d_\d_(\d{17}|notes)\.jpg$")


def write_demo_folder(folder: str, count: int = 160, seed: int = 7) -> int:
    """Write `count` synthetic photos (UTKFace-style names) plus 3 broken files; returns files written.

    A rerun replaces an earlier demo folder; a folder holding anything else is refused (ValueError),
    so --demo never deletes or mixes with a user's photos.
    """
    os.makedirs(folder, exist_ok=True)
    entries = os.listdir(folder)
    foreign = [n for n in entries if not (DEMO_NAME.match(n) and os.path.isfile(os.path.join(folder, n)))]
    if foreign:
        raise ValueError(f"--demo writes its synthetic photos into {folder}, which holds other files "
                         f"(e.g. {foreign[0]!r}); give --demo an empty or new --input folder")
    for name in entries:  # a rerun gives the same folder, not a growing one
        os.remove(os.path.join(folder, name))
    rng = np.random.default_rng(seed)
    for i in range(count):
        age = int(rng.integers(1, 91))
        gender, race = int(rng.integers(0, 2)), int(rng.integers(0, 5))
        face = draw_face(age, rng, 200, gender, race)
        photo, _ = paste_on_background(face, rng)
        stamp = 20260101000000000 + i
        with open(os.path.join(folder, f"{age}_{gender}_{race}_{stamp}.jpg"), "wb") as f:
            f.write(jpeg_bytes(photo))
    # what real folders contain too: a non-image, a truncated file, a photo with nobody in it
    with open(os.path.join(folder, "30_0_0_notes.jpg"), "w") as f:
        f.write("this is text, not a JPEG\n")
    whole = jpeg_bytes(paste_on_background(draw_face(40, rng), rng)[0])
    with open(os.path.join(folder, "40_1_0_20260101999999999.jpg"), "wb") as f:
        f.write(whole[: len(whole) // 3])
    empty_scene, _ = paste_on_background(Image.new("RGB", (10, 10), (120, 120, 120)), rng)
    with open(os.path.join(folder, "50_0_0_20260101888888888.jpg"), "wb") as f:
        f.write(jpeg_bytes(empty_scene))
    return count + 3
