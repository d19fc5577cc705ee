"""Image and audio preprocessing on files made in memory."""

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from services.common.errors import InvalidArgument, ResourceExhausted
from services.preprocess.audio import AudioPreprocessor
from services.preprocess.image import ImagePreprocessor

pytestmark = pytest.mark.unit

RED_BGR = [0, 0, 255]
BLUE_BGR = [255, 0, 0]


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge RGB canvas, with no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    return img


def test_png_to_bgr() -> None:
    bgr, stats, scale = ImagePreprocessor().prepare(encode(halves(40, 20), "PNG"))
    assert bgr.shape == (20, 40, 3) and bgr.dtype == np.uint8 and bgr.flags.c_contiguous
    assert bgr[10, 5].tolist() == RED_BGR and bgr[10, 35].tolist() == BLUE_BGR
    assert scale == (1.0, 1.0)
    assert stats["image_width"] == 40 and stats["image_height"] == 20 and stats["image_resized"] == 0.0
    assert stats["image_megapixels"] == pytest.approx(0.0008)
    assert set(stats) == {
        *("image_width", "image_height", "image_megapixels", "image_brightness"),
        *("image_contrast", "image_resized", "image_bytes"),
    }


def test_jpeg_exif_orientation_6_is_rotated() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = encode(halves(80, 40), "JPEG", quality=95, exif=exif.tobytes())
    bgr, stats, _ = ImagePreprocessor().prepare(data)
    assert bgr.shape == (80, 40, 3)  # portrait after orientation
    assert (stats["image_width"], stats["image_height"]) == (40, 80)
    # Rotating clockwise brings the stored left (red) half to the top.
    np.testing.assert_allclose(bgr[10, 20], RED_BGR, atol=40)
    np.testing.assert_allclose(bgr[70, 20], BLUE_BGR, atol=40)


def test_webp_decodes() -> None:
    bgr, _, _ = ImagePreprocessor().prepare(encode(halves(40, 20), "WEBP", lossless=True))
    assert bgr[10, 5].tolist() == RED_BGR


@pytest.mark.parametrize(
    ("img", "expected_bgr"),
    [
        (Image.new("RGBA", (16, 16), (255, 0, 0, 0)), [255, 255, 255]),  # transparent: white background
        (Image.new("RGBA", (16, 16), (255, 0, 0, 255)), RED_BGR),
        (Image.new("LA", (16, 16), (0, 0)), [255, 255, 255]),
        (Image.new("L", (16, 16), 100), [100, 100, 100]),
        (Image.new("RGB", (16, 16), (255, 0, 0)).convert("P"), RED_BGR),
        (Image.fromarray(np.full((16, 16), 257 * 60, dtype=np.uint16)), [60, 60, 60]),  # 16-bit greyscale
    ],
    ids=["rgba-transparent", "rgba-opaque", "la", "l", "p", "i16"],
)
def test_modes_become_rgb(img: Image.Image, expected_bgr: list[int]) -> None:
    bgr, _, _ = ImagePreprocessor().prepare(encode(img, "PNG"))
    assert bgr.shape == (16, 16, 3)
    assert bgr[8, 8].tolist() == expected_bgr


def test_palette_with_transparency_is_composited() -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.info["transparency"] = 0
    bgr, _, _ = ImagePreprocessor().prepare(encode(img, "PNG", transparency=0))
    assert bgr[8, 8].tolist() == [255, 255, 255]


def test_cmyk_jpeg() -> None:
    bgr, _, _ = ImagePreprocessor().prepare(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    np.testing.assert_allclose(bgr[8, 8], RED_BGR, atol=40)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_image_is_downscaled(fmt: str) -> None:
    img = Image.new("RGB", (4000, 3000), "white")
    img.paste((0, 255, 0), (2400, 1000, 2600, 1200))  # a green square centred on (2500, 1100)
    data = encode(img, fmt)
    bgr, stats, (sx, sy) = ImagePreprocessor().prepare(data)
    assert bgr.shape == (720, 960, 3)
    assert (sx, sy) == pytest.approx((4000 / 960, 3000 / 720))
    assert stats["image_width"] == 4000 and stats["image_height"] == 3000 and stats["image_resized"] == 1.0
    assert stats["image_bytes"] == len(data)
    # The square's centre in the resized image maps back onto its centre in the original.
    ys, xs = np.nonzero((bgr[:, :, 1] > 200) & (bgr[:, :, 2] < 50))
    assert (xs.mean() + 0.5) * sx == pytest.approx(2500, abs=5) and (ys.mean() + 0.5) * sy == pytest.approx(1100, abs=5)


def test_portrait_keeps_aspect() -> None:
    bgr, _, (sx, sy) = ImagePreprocessor(max_side=100).prepare(encode(Image.new("RGB", (300, 1000)), "PNG"))
    assert bgr.shape == (100, 30, 3) and (sx, sy) == (10.0, 10.0)


def test_too_small() -> None:
    with pytest.raises(InvalidArgument, match="image is 20x4 pixels; each side must be at least 8"):
        ImagePreprocessor().prepare(encode(Image.new("RGB", (20, 4)), "PNG"))


def test_truncated_jpeg() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(InvalidArgument, match=r"^image could not be decoded: .*truncated"):
        ImagePreprocessor().prepare(data[: len(data) // 2])


def test_random_bytes_and_unsupported_format() -> None:
    with pytest.raises(InvalidArgument, match=r"^image could not be decoded: not a JPEG, PNG or WebP file$"):
        ImagePreprocessor().prepare(np.random.default_rng(0).bytes(1000))
    with pytest.raises(InvalidArgument, match=r"^image is image/gif; supported: JPEG, PNG, WebP$"):
        ImagePreprocessor().prepare(encode(Image.new("RGB", (16, 16)), "GIF"))


def test_decompression_bombs_are_refused_before_decoding() -> None:
    # Far past Pillow's own limit: it refuses at open.
    with pytest.raises(ResourceExhausted, match="the limit is 40 megapixels"):
        ImagePreprocessor().prepare(png_claiming(100_000, 100_000))
    # Within Pillow's limit but past ours: refused from the header alone (there are no pixels to decode).
    with pytest.raises(ResourceExhausted, match=r"image is 9000x5000 \(45.0 megapixels\); the limit is 40 megapixels"):
        ImagePreprocessor().prepare(png_claiming(9000, 5000))
    with pytest.raises(ResourceExhausted, match=r"the limit is 0\.001 megapixels"):
        ImagePreprocessor(max_pixels=1000).prepare(encode(Image.new("RGB", (40, 40)), "PNG"))


def test_brightness_and_contrast() -> None:
    prep = ImagePreprocessor()
    _, white, _ = prep.prepare(encode(Image.new("RGB", (32, 32), "white"), "PNG"))
    _, black, _ = prep.prepare(encode(Image.new("RGB", (32, 32), "black"), "PNG"))
    assert white["image_brightness"] == pytest.approx(1.0) and black["image_brightness"] == 0.0
    assert white["image_contrast"] == 0.0 and black["image_contrast"] == 0.0
    _, half, _ = prep.prepare(encode(halves(32, 32).convert("L").point(lambda v: 255 if v > 50 else 0), "PNG"))
    assert half["image_brightness"] == pytest.approx(0.5) and half["image_contrast"] == pytest.approx(0.5)


def test_image_prepare_is_thread_safe() -> None:
    prep = ImagePreprocessor(max_side=64)
    files = [encode(halves(200 + 10 * i, 100), "JPEG") for i in range(8)]
    serial = [prep.prepare(f)[0] for f in files]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda f: prep.prepare(f)[0], files * 4))
    for i, arr in enumerate(parallel):
        np.testing.assert_array_equal(arr, serial[i % len(files)])


def wav(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int, amplitude: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    samples: np.ndarray = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return samples


def test_stereo_44k_wav_becomes_16k_mono() -> None:
    left = tone(1.5, 44100)
    data = wav(np.stack([left, np.zeros_like(left)], axis=1), 44100)
    samples, stats = AudioPreprocessor().prepare(data)
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) == 24000
    assert stats["audio_duration_s"] == pytest.approx(1.5)
    assert stats["audio_sample_rate"] == 44100 and stats["audio_channels"] == 2
    assert stats["audio_peak"] == pytest.approx(0.5, abs=1e-3)  # of the decoded input
    assert stats["audio_rms"] == pytest.approx(0.25 / np.sqrt(2), rel=0.01)  # of the mono mix: half the tone
    assert stats["audio_clipped_ratio"] == 0.0 and stats["audio_bytes"] == len(data)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_flac_and_ogg_decode(fmt: str) -> None:
    samples, stats = AudioPreprocessor().prepare(wav(tone(1.0, 16000), 16000, fmt))
    assert len(samples) == 16000 and stats["audio_sample_rate"] == 16000
    assert stats["audio_rms"] == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert np.abs(samples).max() <= 1.0


def test_empty_audio() -> None:
    with pytest.raises(InvalidArgument, match=r"^audio has no samples$"):
        AudioPreprocessor().prepare(wav(np.zeros((0, 1), dtype=np.float32), 16000))


def test_undecodable_audio() -> None:
    with pytest.raises(InvalidArgument, match=r"^audio could not be decoded: Format not recognised"):
        AudioPreprocessor().prepare(np.random.default_rng(0).bytes(4000))
    with pytest.raises(InvalidArgument, match=r"^audio is AIFF; supported: WAV, FLAC, OGG$"):
        AudioPreprocessor().prepare(wav(tone(0.1, 16000), 16000, "AIFF"))


def test_too_long_audio_is_refused_from_the_header() -> None:
    with pytest.raises(ResourceExhausted, match=r"^audio is 3.0 s long; the limit is 2 s$"):
        AudioPreprocessor(max_seconds=2).prepare(wav(tone(3.0, 8000), 8000))
    samples, _ = AudioPreprocessor(max_seconds=2).prepare(wav(tone(2.0, 8000), 8000))
    assert len(samples) == 32000


def test_clipping_ratio() -> None:
    x = tone(1.0, 16000, amplitude=0.3)
    x[:1600] = 1.0
    x[1600:2400] = -1.0
    _, stats = AudioPreprocessor().prepare(wav(x, 16000, subtype="PCM_16"))
    assert stats["audio_clipped_ratio"] == pytest.approx(0.15)
    assert stats["audio_peak"] == pytest.approx(1.0, abs=1e-3)


def test_float_wav_is_clipped_to_unit_range() -> None:
    samples, stats = AudioPreprocessor().prepare(wav(tone(0.5, 16000, amplitude=2.0), 16000, subtype="FLOAT"))
    assert np.abs(samples).max() == pytest.approx(1.0) and stats["audio_peak"] == pytest.approx(2.0, rel=1e-3)
