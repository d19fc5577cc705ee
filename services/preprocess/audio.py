"""Audio preprocessing: decode, mix down to mono and resample for the speech model.

The length is read from the header and checked before any sample is decoded;
decoding then goes block by block, so a long stereo file never sits in memory
as more than its mono mix.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from services.common.errors import InvalidArgument, ResourceExhausted

# libsndfile's names for the containers we accept (WAVEX: WAV with WAVE_FORMAT_EXTENSIBLE).
FORMATS = ("WAV", "WAVEX", "FLAC", "OGG")
CLIP_LEVEL = 0.999
_BLOCK_FRAMES = 1 << 16


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without the '<_io.BytesIO object at 0x...>' soundfile wraps them in."""
    return str(getattr(exc, "error_string", "") or exc)


class AudioPreprocessor:
    """Thread-safe: holds only its settings, so ``prepare`` may run in an executor."""

    def __init__(self, rate: int = 16000, max_seconds: float = 600.0) -> None:
        self.rate = rate
        self.max_seconds = max_seconds

    def _too_long(self, seconds: float) -> ResourceExhausted:
        return ResourceExhausted(f"audio is {seconds:.1f} s long; the limit is {self.max_seconds:g} s")

    def prepare(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        """Mono float32 samples in [-1, 1] at ``rate`` Hz, and input statistics."""
        try:
            with sf.SoundFile(io.BytesIO(data)) as snd:
                if snd.format not in FORMATS:
                    raise InvalidArgument(f"audio is {snd.format}; supported: WAV, FLAC, OGG")
                rate, channels = snd.samplerate, snd.channels
                if snd.frames / rate > self.max_seconds:
                    raise self._too_long(snd.frames / rate)
                mono, peak, clipped_ratio = self._read_mono(snd, limit=int(self.max_seconds * rate))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"audio could not be decoded: {_reason(exc)}") from exc
        if not len(mono):
            raise InvalidArgument("audio has no samples")
        duration = len(mono) / rate
        if rate != self.rate:
            mono = soxr.resample(mono, rate, self.rate, quality="HQ")
        # The resampler's ringing can overshoot a full-scale input slightly.
        samples = np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32)
        stats = {
            "audio_duration_s": duration,
            "audio_sample_rate": float(rate),
            "audio_channels": float(channels),
            "audio_rms": float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))),
            "audio_peak": peak,
            "audio_clipped_ratio": clipped_ratio,
            "audio_bytes": float(len(data)),
        }
        return samples, stats

    def _read_mono(self, snd: sf.SoundFile, limit: int) -> tuple[np.ndarray, float, float]:
        """The mean of the channels, with the peak and clipped fraction of the decoded samples.

        Peak and clipping are measured before mixing and resampling: both blur them
        (a clipped left channel averaged with a quiet right one no longer looks clipped).
        """
        blocks: list[np.ndarray] = []
        frames = clipped = 0
        peak = 0.0
        while True:
            chunk = snd.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(chunk):
                break
            frames += len(chunk)
            if frames > limit:  # the header understated the length (OGG's is an estimate)
                raise self._too_long(frames / snd.samplerate)
            magnitude = np.abs(chunk)
            peak = max(peak, float(magnitude.max()))
            clipped += int(np.count_nonzero(magnitude >= CLIP_LEVEL))
            blocks.append(chunk.mean(axis=1, dtype=np.float32))
        mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
        return mono, peak, clipped / max(1, frames * snd.channels)
