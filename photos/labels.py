"""Age-label parsers: pure functions from a file name (or manifest row) to a Label.

Each parser returns a Label or raises LabelError with a detail a person can act on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from schemas.tables import MAX_AGE, MIN_AGE


class LabelError(ValueError):
    """The label of one input cannot be used; str(e) says why."""


@dataclass(frozen=True)
class Label:
    age: int
    gender: Optional[int] = None
    race: Optional[int] = None
    subject_id: Optional[str] = None


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def check_age(age, name: str) -> int:
    """The age as an int in MIN_AGE..MAX_AGE, else LabelError."""
    try:
        value = float(age)
    except (TypeError, ValueError, OverflowError):
        raise LabelError(f"{name}: age {age!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise LabelError(f"{name}: age {age!r} is not a finite number")
    if not value.is_integer():
        raise LabelError(f"{name}: age {age!r} is not a whole number of years")
    if not MIN_AGE <= value <= MAX_AGE:
        raise LabelError(f"{name}: age {int(value)} is outside {MIN_AGE}..{MAX_AGE}")
    return int(value)


_UTK_FIELD = re.compile(r"^\d+$")


def parse_utkface(path: str) -> Label:
    """UTKFace: `age_gender_race_datetime.jpg[.chip.jpg]`.

    Malformed names with a field missing (e.g. `39_1_20170116174525125.jpg.chip.jpg`) keep the
    leading age; which code is missing cannot be told, so gender and race stay unknown (None).
    In a well-formed name an invalid code (or an empty field) is None too.
    """
    name = basename(path)
    stem = name.split(".", 1)[0]
    parts = stem.split("_")
    if not parts[0] or not _UTK_FIELD.match(parts[0]):
        raise LabelError(f"{name}: UTKFace names start with the age, e.g. 25_0_1_20170116174525125.jpg")
    age = check_age(parts[0], name)
    gender = race = None
    if len(parts) == 4:
        gender = int(parts[1]) if parts[1] in ("0", "1") else None
        race = int(parts[2]) if parts[2] in ("0", "1", "2", "3", "4") else None
    return Label(age=age, gender=gender, race=race)


_FGNET = re.compile(r"^(\d{3})A(\d{2})([a-z])?\.(jpe?g|png|bmp)$", re.IGNORECASE)


def parse_fgnet(path: str) -> Label:
    """FG-NET: `SSSAaa[x].JPG` (subject SSS, age aa, optional letter for a second photo)."""
    name = basename(path)
    m = _FGNET.match(name)
    if not m:
        raise LabelError(f"{name}: FG-NET names look like 001A02.JPG or 001A43a.JPG (subject, 'A', age)")
    return Label(age=check_age(m.group(2), name), subject_id=f"fgnet:{m.group(1)}")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or \
        (isinstance(value, str) and value.strip() == "")


def label_from_manifest(path: str, age, gender=None, race=None, subject_id=None) -> Label:
    """A manifest row (already joined to its file): age required, the rest optional.

    Values may be strings as read from the file ("25", "25.0", "abc", "NaN"); anything that is not a
    usable value raises LabelError, never another exception."""
    name = basename(path)
    if _missing(age):
        raise LabelError(f"{name}: no row in the label manifest (or its age is empty)")

    def code(value, allowed, what):
        if _missing(value):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if number != number or not number.is_integer() or int(number) not in allowed:
            raise LabelError(f"{name}: {what} {value!r} is not one of {sorted(allowed)}")
        return int(number)

    return Label(
        age=check_age(age, name),
        gender=code(gender, {0, 1}, "gender"),
        race=code(race, {0, 1, 2, 3, 4}, "race"),
        subject_id=None if _missing(subject_id) else str(subject_id).strip(),
    )


PARSERS = {"utkface": parse_utkface, "fgnet": parse_fgnet}
