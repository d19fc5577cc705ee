"""Recognising encoded media by their first bytes, before any decoder sees them.

Pure: no I/O and no decoding. The gateway uses :func:`check_media` to refuse a
wrong or unsupported file with a message that names the input, instead of
letting a decoder fail later with a vaguer one.
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
AUDIO_TYPES = ("audio/wav", "audio/flac", "audio/ogg")

# Short names for messages, in the order of the supported tuples.
_NAMES = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WebP",
    "audio/wav": "WAV",
    "audio/flac": "FLAC",
    "audio/ogg": "OGG",
}
_SUPPORTED = {"image": IMAGE_TYPES, "audio": AUDIO_TYPES}

# Fixed signatures at offset 0, checked in order.
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"ID3", "audio/mpeg"),
)


def _is_mpeg_frame(data: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then a layer other than the reserved 00.

    The layer test keeps out ADTS AAC (``FF F1``), whose sync looks the same.
    """
    return len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 0x06 != 0


def sniff(data: bytes) -> str | None:
    """The media type that ``data`` starts like, or None when it is none we know."""
    if data[:4] == b"RIFF" and len(data) >= 12:
        # RIFF holds both WAV and WebP: the form type sits after the 4-byte size.
        return {b"WAVE": "audio/wav", b"WEBP": "image/webp"}.get(data[8:12])
    for prefix, media_type in _PREFIXES:
        if data.startswith(prefix):
            return media_type
    return "audio/mpeg" if _is_mpeg_frame(data) else None


def _listing(types: tuple[str, ...], last: str) -> str:
    """("JPEG", "PNG", "WebP") as 'JPEG, PNG{last}WebP'."""
    names = [_NAMES[t] for t in types]
    return f"{', '.join(names[:-1])}{last}{names[-1]}"


def check_media(name: str, data: bytes, modality: str) -> str:
    """The media type of input ``name``, or InvalidArgument saying what is wrong with it.

    ``modality`` is ``"image"`` or ``"audio"``; anything else is a programming error (ValueError).
    """
    if modality not in _SUPPORTED:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(_SUPPORTED)}")
    supported = _SUPPORTED[modality]
    if not data:
        raise InvalidArgument(f"input {name!r} is empty (0 bytes)")
    media_type = sniff(data)
    if media_type is None:
        raise InvalidArgument(
            f"input {name!r} is not a supported {modality} file; expected {_listing(supported, ' or ')}"
        )
    kind = media_type.split("/", 1)[0]
    if kind != modality:
        article = "an" if kind[0] in "aeiou" else "a"
        raise InvalidArgument(
            f"input {name!r} is {article} {kind} file ({media_type}), not {modality}; "
            f"expected {_listing(supported, ' or ')}"
        )
    if media_type not in supported:
        raise InvalidArgument(f"input {name!r} is {media_type}; supported: {_listing(supported, ', ')}")
    return media_type
