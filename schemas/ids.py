"""Identifiers that cross stages: one definition, read by prepare, score and evaluate alike."""
from __future__ import annotations

import hashlib


def content_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def face_id(content_sha256_hex: str, face_index: int = 0) -> str:
    """A face's stable id: the first 24 hex digits of its file's sha256 and its face index (0 = largest)."""
    return f"{content_sha256_hex[:24]}-{face_index}"
