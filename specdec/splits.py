"""The stable held-out split of data rows, shared by ``train/`` (drafters never train on it) and the bench's quality
check (a quantized target is scored on it)."""

from __future__ import annotations

import hashlib

VAL_FRACTION = 0.05  # train/'s data configs' default


def is_validation(row_id: str, val_fraction: float = VAL_FRACTION) -> bool:
    """Stable split: a row is held out when the hash of its id falls below ``val_fraction``."""
    h = int(hashlib.sha1(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction
