"""Deterministic train/val/test assignment from a hash of the subject (or the content)."""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence, Tuple

from schemas.tables import SPLITS


def parse_fractions(text: str) -> Tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); ValueError with a clear message otherwise."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--splits {text!r}: give three numbers like 0.8,0.1,0.1") from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        raise ValueError(f"--splits {text!r}: give three finite, non-negative numbers (train,val,test)")
    if abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--splits {text!r}: the fractions add up to {sum(parts):g}, not 1")
    return parts  # type: ignore[return-value]


def split_key(subject_id: Optional[str], content_sha256: str) -> str:
    """Everyone's photos go to one split: key on the subject when it is known."""
    return f"subject:{subject_id}" if subject_id else f"content:{content_sha256}"


def assign_split(key: str, fractions: Sequence[float], salt: str = "") -> str:
    """Map `key` to a split name; the same key (and salt) always lands in the same split."""
    digest = hashlib.sha256(f"{salt}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]
