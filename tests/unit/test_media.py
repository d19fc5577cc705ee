"""Recognising media by their magic bytes, and the messages for wrong inputs."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.media import AUDIO_TYPES, IMAGE_TYPES, check_media, sniff

pytestmark = pytest.mark.unit


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


def _audio(fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16000, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_sniff_real_images(fmt: str, expected: str) -> None:
    assert sniff(_image(fmt)) == expected


@pytest.mark.parametrize(("fmt", "expected"), [("WAV", "audio/wav"), ("FLAC", "audio/flac"), ("OGG", "audio/ogg")])
def test_sniff_real_audio(fmt: str, expected: str) -> None:
    assert sniff(_audio(fmt)) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "audio/mpeg"),
        (b"\xff\xfb\x90\x64\x00", "audio/mpeg"),  # MPEG-1 layer III frame header
        (b"\xff\xf1\x50\x80", None),  # ADTS AAC: same sync bits, reserved layer
        (b"MM\x00*\x00\x00\x00\x08", "image/tiff"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", None),
        (b"RIFF", None),
        (b"%PDF-1.7", None),
        (b"", None),
    ],
)
def test_sniff_edge_cases(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


def test_check_media_accepts_supported_types() -> None:
    for fmt, media_type in zip(("JPEG", "PNG", "WEBP"), IMAGE_TYPES, strict=True):
        assert check_media("image", _image(fmt), "image") == media_type
    for fmt, media_type in zip(("WAV", "FLAC", "OGG"), AUDIO_TYPES, strict=True):
        assert check_media("audio", _audio(fmt), "audio") == media_type


def test_check_media_empty() -> None:
    with pytest.raises(InvalidArgument, match=r"^input 'image' is empty \(0 bytes\)$"):
        check_media("image", b"", "image")


def test_check_media_unrecognised() -> None:
    with pytest.raises(
        InvalidArgument, match=r"^input 'audio' is not a supported audio file; expected WAV, FLAC or OGG$"
    ):
        check_media("audio", b"hello world", "audio")
    with pytest.raises(
        InvalidArgument, match=r"^input 'scan' is not a supported image file; expected JPEG, PNG or WebP$"
    ):
        check_media("scan", b"%PDF-1.7", "image")


def test_check_media_unsupported_type() -> None:
    with pytest.raises(InvalidArgument, match=r"^input 'image' is image/gif; supported: JPEG, PNG, WebP$"):
        check_media("image", _image("GIF"), "image")
    with pytest.raises(InvalidArgument, match=r"^input 'audio' is audio/mpeg; supported: WAV, FLAC, OGG$"):
        check_media("audio", b"ID3\x04\x00", "audio")


def test_check_media_wrong_modality() -> None:
    with pytest.raises(InvalidArgument, match=r"^input 'audio' is an image file \(image/png\), not audio"):
        check_media("audio", _image("PNG"), "audio")
    with pytest.raises(InvalidArgument, match=r"^input 'image' is an audio file \(audio/wav\), not image"):
        check_media("image", _audio("WAV"), "image")


def test_check_media_unknown_modality_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown modality"):
        check_media("video", b"\x00", "video")
