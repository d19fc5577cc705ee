"""Offline generators of test media: sentences, text images and speech/silence/tone audio.

Everything is made on this machine, with no downloads:

* text images: Pillow draws black text on white in Debian's DejaVu Sans
  (``fc-match`` finds the file; a glob under ``/usr/share/fonts`` is the fallback);
* speech: Debian's ``espeak-ng -w`` writes a WAV (22.05 kHz), which is resampled
  in-process with ``soxr`` to the requested rate, mono;
* containers: ``soundfile`` (libsndfile) writes WAV (PCM 16), FLAC or OGG/Vorbis.

Audio helpers take and return float32 samples in [-1, 1].
"""

from __future__ import annotations

import functools
import glob
import io
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "bgr_array",
    "decode_audio",
    "encode_audio",
    "font_path",
    "silence_wav",
    "speech_samples",
    "speech_wav",
    "text_image",
    "tone_wav",
]

Samples = npt.NDArray[np.float32]

# WAV/FLAC carry 16-bit PCM; OGG carries Vorbis.
#: Everyday sentences on different topics; WORDS re-mixed by :func:`sentence` give varied traffic.
SENTENCES = (
    "the market opened higher as investors weighed new data on inflation and jobs",
    "our team won the final match after a late goal in extra time",
    "the new phone has a faster chip and a brighter screen",
    "doctors recommend more sleep and regular exercise for heart health",
    "the band announced a world tour with concerts in twelve cities",
)
WORDS = tuple(word for line in SENTENCES for word in line.split())


def sentence(rng: random.Random, words: int) -> str:
    """``words`` words drawn from :data:`WORDS`, as one capitalised sentence."""
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


_SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS"}
# A sample counts as signal when |x| exceeds this fraction of the clip's peak.
_SIGNAL_FRACTION = 0.01


# ---------------------------------------------------------------------- images
@functools.cache
def font_path() -> str:
    """The DejaVu Sans TTF file: ``fc-match`` first, a glob under /usr/share/fonts second."""
    if shutil.which("fc-match"):
        found = subprocess.run(
            ["fc-match", "-f", "%{file}", "DejaVuSans"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found and Path(found).is_file() and "dejavu" in found.lower():
            return found
    for pattern in ("/usr/share/fonts/**/DejaVuSans.ttf", "/usr/share/fonts/**/DejaVu*.ttf"):
        matches = sorted(glob.glob(pattern, recursive=True))
        if matches:
            return matches[0]
    raise FileNotFoundError("no DejaVu font found: apt-get install fonts-dejavu-core")


def text_image(phrase: str, *, size: tuple[int, int] = (640, 160), font_size: int = 48, fmt: str = "PNG") -> bytes:
    """``phrase`` in black on a white RGB image of ``size`` (width, height), centred, encoded as ``fmt``.

    An empty phrase gives a blank white image.
    """
    image = Image.new("RGB", size, (255, 255, 255))
    if phrase:
        draw = ImageDraw.Draw(image)
        font = ImageFont.truetype(font_path(), font_size)
        left, top, right, bottom = draw.textbbox((0, 0), phrase, font=font)
        x = (size[0] - (right - left)) / 2 - left
        y = (size[1] - (bottom - top)) / 2 - top
        draw.text((x, y), phrase, fill=(0, 0, 0), font=font)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def bgr_array(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode an encoded image into a ``[H, W, 3]`` uint8 array in BGR order (as OpenCV uses)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


# ----------------------------------------------------------------------- audio
def encode_audio(samples: npt.ArrayLike, rate: int, fmt: str = "WAV") -> bytes:
    """Mono float samples in [-1, 1] as a WAV (PCM 16), FLAC (PCM 16) or OGG (Vorbis) file."""
    key = fmt.upper()
    if key not in _SUBTYPES:
        raise ValueError(f"unsupported audio format {fmt!r}; one of {sorted(_SUBTYPES)}")
    data = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    out = io.BytesIO()
    sf.write(out, data, rate, format=key, subtype=_SUBTYPES[key])
    return out.getvalue()


def decode_audio(data: bytes) -> tuple[Samples, int]:
    """(float32 mono samples, sample rate) of an encoded audio file; channels are averaged."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono: Samples = samples.mean(axis=1, dtype=np.float32)
    return mono, int(rate)


def silence_wav(seconds: float, rate: int = 16000) -> bytes:
    """``seconds`` of digital silence as a 16-bit mono WAV."""
    return encode_audio(np.zeros(round(seconds * rate), dtype=np.float32), rate)


def tone_wav(freq_hz: float = 440.0, seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.3) -> bytes:
    """A sine tone as a 16-bit mono WAV."""
    t = np.arange(round(seconds * rate), dtype=np.float64) / rate
    return encode_audio((amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32), rate)


def _signal_bounds(samples: Samples) -> tuple[int, int]:
    """[first, last + 1) of the samples whose magnitude exceeds 1 % of the peak."""
    magnitude = np.abs(samples)
    peak = float(magnitude.max(initial=0.0))
    if peak == 0.0:
        return 0, 0
    loud = np.flatnonzero(magnitude > peak * _SIGNAL_FRACTION)
    return int(loud[0]), int(loud[-1]) + 1


@functools.cache
def _espeak(sentence: str, voice: str) -> tuple[Samples, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng not found: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory(prefix="loom-media-") as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-w", str(wav), sentence], check=True, capture_output=True)
        return decode_audio(wav.read_bytes())


def speech_samples(sentence: str, *, rate: int = 16000, voice: str = "en") -> Samples:
    """``sentence`` spoken by espeak-ng, mono at ``rate``, trimmed to where the signal is.

    espeak-ng leaves short near-silent stretches at both ends; they are cut, so the
    first and last samples are part of the speech. The peak is scaled to 0.9.
    """
    raw, raw_rate = _espeak(sentence, voice)
    samples = raw if raw_rate == rate else np.asarray(soxr.resample(raw, raw_rate, rate), dtype=np.float32)
    first, end = _signal_bounds(samples)
    if end <= first:
        raise RuntimeError(f"espeak-ng produced no audible signal for {sentence!r}")
    speech = samples[first:end]
    peak = float(np.abs(speech).max())
    scaled: Samples = (speech * (0.9 / peak)).astype(np.float32)
    return scaled


def speech_wav(
    sentence: str, *, lead_silence_s: float = 1.0, tail_silence_s: float = 1.0, rate: int = 16000
) -> tuple[bytes, float, float]:
    """(16-bit mono WAV, speech_start_s, speech_end_s) of ``sentence`` between two silences.

    The speech is trimmed to its signal (see :func:`speech_samples`) and padded with
    exactly ``lead_silence_s`` / ``tail_silence_s`` of digital silence, so
    ``speech_start_s`` is the lead silence and ``speech_end_s`` the end of the last
    audible sample.
    """
    speech = speech_samples(sentence, rate=rate)
    lead = np.zeros(round(lead_silence_s * rate), dtype=np.float32)
    tail = np.zeros(round(tail_silence_s * rate), dtype=np.float32)
    start_s = lead.size / rate
    end_s = (lead.size + speech.size) / rate
    return encode_audio(np.concatenate((lead, speech, tail)), rate), start_s, end_s
