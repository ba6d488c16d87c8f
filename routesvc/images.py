"""Image inputs: which formats are taken, what a file's first bytes say it is and how big it is,
and what an image costs in input tokens.

An image's size is read from its header alone (PNG's IHDR, GIF's screen descriptor, JPEG's frame
header, WebP's VP8/VP8L/VP8X header), never decoded. Its token cost follows what the providers
publish for the models of the catalog:

- Anthropic: an image whose long edge is over 1568 px is scaled to fit it, and one of more than
  ~1,600 tokens is scaled to about that; it then costs width * height / 750 tokens. Anthropic
  has no ``detail``: an image costs the same whatever the request sets.
- OpenAI, high detail (and the default ``auto``, which may choose high): scaled to fit 2048 x
  2048, then down so that its shortest side is at most 768 px; it costs 85 tokens plus 170 per
  512-px tile. Low detail: a flat 85 tokens, whatever the size.

Each model's images are estimated by the formula of its provider's kind (``image_estimate``
gives all of them, ``ImageEstimate.for_kind`` picks one): OpenAI's for ``openai``, Anthropic's
for ``anthropic``, and the larger of the two, image by image, for ``openai_compatible``, a
server whose formula is unknown. An image whose size is unknown (given by URL, which routesvc
never fetches) counts as the most its formula gives: ``OPENAI_MAX_TOKENS`` (8 tiles) at high or
auto detail, 85 at low, ``ANTHROPIC_MAX_TOKENS`` on Anthropic. A model that bills images at
another rate says so with ``image_token_scale`` (``cost.billed_input_tokens``), which multiplies
its own formula's tokens: gpt-4o-mini counts ~33.3x gpt-4o's tokens for an image (2,833 + 5,667
per tile; 2,833 at low detail), so the default config gives it 33.33. Not modelled: Claude
models with a larger native resolution than 1568 px, which cost more per large image.
"""

from __future__ import annotations

import math

from routesvc.models import Image, ImageDetail, ImageEstimate

MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

_ANTHROPIC_LONG_EDGE = 1568
_ANTHROPIC_PIXELS_PER_TOKEN = 750
_OPENAI_BOX = 2048
_OPENAI_SHORT_SIDE = 768
_OPENAI_TILE = 512
_OPENAI_BASE_TOKENS = 85
_OPENAI_TILE_TOKENS = 170

# The most Anthropic's formula gives: it scales larger images down to about this.
ANTHROPIC_MAX_TOKENS = 1600
# The most OpenAI's high detail gives: within 2048 px, with the short side at most 768 px, an
# image spans at most 4 x 2 tiles (a 2048 x 768 image): 85 + 170 * 8.
OPENAI_MAX_TOKENS = _OPENAI_BASE_TOKENS + _OPENAI_TILE_TOKENS * (_OPENAI_BOX // _OPENAI_TILE) * math.ceil(
    _OPENAI_SHORT_SIDE / _OPENAI_TILE
)

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic), which hold the size;
# C4 (Huffman tables), C8 (reserved) and CC (arithmetic conditioning) are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def sniff_media_type(data: bytes) -> str:
    """The format ``data`` starts with (one of ``MEDIA_TYPES``), or "" when none of them."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def dimensions(data: bytes, media_type: str) -> tuple[int, int]:
    """Width and height in pixels from the header of an image of ``media_type``; (0, 0) when the
    header does not say (truncated, or a kind of file this does not read). A size read may be 0
    (a GIF's screen, a VP8 frame's): request validation refuses both."""
    if media_type == "image/png" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if media_type == "image/gif" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if media_type == "image/webp":
        return _webp_dimensions(data)
    if media_type == "image/jpeg":
        return _jpeg_dimensions(data)
    return 0, 0


def _webp_dimensions(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return 0, 0


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """The size in the first frame header, found by hopping from segment to segment."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return 0, 0
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_FRAMES:
            return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return 0, 0


def image_estimate(image: Image) -> ImageEstimate:
    """``image``'s estimated input tokens under each provider kind's formula; see the module
    docstring."""
    openai = _openai_tokens(image.width, image.height, image.detail)
    anthropic = _anthropic_tokens(image.width, image.height)
    return ImageEstimate(openai=openai, anthropic=anthropic, larger=max(openai, anthropic))


def _anthropic_tokens(width: int, height: int) -> int:
    if width <= 0 or height <= 0:
        return ANTHROPIC_MAX_TOKENS
    scale = min(1.0, _ANTHROPIC_LONG_EDGE / max(width, height))
    tokens = math.ceil(width * scale * (height * scale) / _ANTHROPIC_PIXELS_PER_TOKEN)
    return min(tokens, ANTHROPIC_MAX_TOKENS)


def _openai_tokens(width: int, height: int, detail: ImageDetail) -> int:
    if detail is ImageDetail.LOW:
        return _OPENAI_BASE_TOKENS
    if width <= 0 or height <= 0:
        return OPENAI_MAX_TOKENS
    scale = min(1.0, _OPENAI_BOX / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, _OPENAI_SHORT_SIDE / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / _OPENAI_TILE) * math.ceil(h / _OPENAI_TILE)
    return _OPENAI_BASE_TOKENS + _OPENAI_TILE_TOKENS * tiles
