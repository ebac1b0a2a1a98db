"""The bucket spelling of the contract: `FRAMESxHEIGHTxWIDTH` (`49x480x720`), as `--buckets` takes it and as the
manifest, the sample JSON and the index files write it. Parsed and written here only."""

from __future__ import annotations

from ..errors import UserError


def bucket_name(frames: int, height: int, width: int) -> str:
    """`(49, 480, 720)` -> `'49x480x720'`, the spelling of `--buckets` and of the manifest's histograms."""
    return f"{frames}x{height}x{width}"



def parse_bucket(text: str) -> tuple[int, int, int]:
    """`'49x480x720'` -> (49, 480, 720): frames x height x width."""
    try:
        f, h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--buckets {text!r}: write each bucket as FRAMESxHEIGHTxWIDTH, e.g. 49x480x720.") from None
    if min(f, h, w) <= 0:
        raise UserError(f"--buckets {text!r}: frames, height and width must be positive.")
    return f, h, w
