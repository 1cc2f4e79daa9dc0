"""Shape buckets: the few lengths that compiled code is specialised for (generate's prompt and cache lengths,
training's row and label-cap lengths), so new lengths reuse compiled programs."""
from __future__ import annotations

from typing import Optional


def bucket_length(n: int, minimum: int = 16, maximum: Optional[int] = None) -> int:
    """Smallest of minimum, 2^k and 3*2^(k-1) >= n (at most 1.5x; a handful of shapes over all lengths), then
    capped at `maximum` when given. With a power-of-two minimum the buckets run minimum, 1.5x, 2x, 3x, 4x, ...:
    16, 24, 32, 48, 64, 96, ..."""
    n = int(n)
    if n <= minimum:
        size = minimum
    else:
        p = 1 << (n - 1).bit_length()
        size = 3 * p // 4 if 3 * p // 4 >= n else p
    return size if maximum is None else min(size, maximum)
