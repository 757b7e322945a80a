"""Audio that libsndfile cannot read (m4a/aac, opus/webm, amr, wma, mp4 audio tracks...), read through
ffmpeg's own libraries via PyAV (`av` on PyPI bundles them: no system ffmpeg needed).

`audio_files` decides which files come here (by extension, or when libsndfile does not recognise a file)
and keeps the same contract: every problem is an `AudioError(path, reason)` with a one-line reason.

Why every file is decoded to the end, at ingest too: compressed containers carry no trustworthy sample
count (ADTS and AMR have none, a WebM from a browser has no duration, an MP4's edit list and a codec's
priming samples shift it), so the stored frames and duration are what the decoder produced. Decoding to
the end is also what finds a cut or corrupt stream: PyAV raises on a decoder error, and a demuxer that
stops early (a cut Ogg or WebM) shows as fewer seconds than the container's index declares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np

from qwen_tasks.errors import AudioError

# Demuxers whose declared duration comes from an index written after the audio (MP4 sample tables, the
# Matroska/WebM segment duration, the granule of Ogg's last page, ASF's play duration): when decoding
# yields clearly less, the stream stopped early. Elsewhere (ADTS, AMR, MP3) ffmpeg estimates the
# duration from the bitrate, which proves nothing, so it is not compared.
_INDEXED_DEMUXERS = frozenset({"mov", "matroska", "ogg", "asf"})
# Decoded audio may fall short of the declared duration by codec delay (Opus pre-skip, WMA preroll:
# tens of ms) without being cut; more than this is a truncation.
_SHORTFALL_S = 0.25
_SHORTFALL_FRACTION = 0.01
_ISO_MEDIA = b"ftyp"  # bytes 4..8 of an MP4/M4A/3GP/MOV file


@dataclass(frozen=True)
class Decoded:
    """What decoding the first audio stream produced. `mono` is the channel mean (float32, at
    `sample_rate`) when asked for, else None: ingest only needs the counts."""

    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str
    mono: np.ndarray | None


def _message(exc: BaseException) -> str:
    """ffmpeg's words for an error, without PyAV's errno and the file name or call it appends."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return " ".join(str(exc).split()) or type(exc).__name__


def _format_name(container: av.container.InputContainer, path: str) -> str:
    """The container as people call it: the file's extension when the demuxer reads that kind of file
    ('M4A', 'WEBM', 'AMR'), else the demuxer's first name ('ASF' for .wma, 'OGG' for .opus, 'MOV')."""
    names = container.format.name.split(",")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext and (ext in names or ext in container.format.extensions):
        return ext.upper()
    return names[0].upper()


def _float_samples(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 (channels, samples) in [-1, 1]: ffmpeg's integer sample formats scaled,
    its packed formats (one plane, channels interleaved) split into rows."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        data = data.reshape(-1, frame.layout.nb_channels).T
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    return data.astype(np.float32) / np.float32(-np.iinfo(data.dtype).min)


def _open_failure(path: str, exc: BaseException, head: bytes) -> AudioError:
    """ffmpeg could not read the container's header: a cut file, or not audio at all."""
    message = _message(exc)
    if isinstance(exc, av.EOFError):
        return AudioError(path, f"truncated: the file ends inside its container header ({message})")
    if head[4:8] == _ISO_MEDIA:
        # An MP4/M4A recorder writes the index (moov) last, so a cut recording is an ISO file without one.
        return AudioError(
            path, f"truncated or malformed: MP4/M4A container without a readable index ({message})"
        )
    return AudioError(path, f"not an audio file: ffmpeg cannot read it ({message})")


def decode(source: int | BinaryIO, path: str, *, keep: bool) -> Decoded:
    """Decode the first audio stream of `source` to the end, from offset 0: an open file descriptor (it
    stays open) or the file's bytes already in memory (labelling hashes what it decodes: one read).

    `keep`: also return the mono waveform (labelling); without it memory stays flat (ingest).
    Raises AudioError for a file ffmpeg cannot read, one without an audio stream, a decoder error
    (named with the time it happened), non-finite samples, a stream that stops before the length its
    index declares, or one that decodes to nothing.
    """
    if not isinstance(source, int):
        source.seek(0)
        return _decode_file(source, path, keep=keep)
    os.lseek(source, 0, os.SEEK_SET)
    with open(source, "rb", closefd=False) as f:
        return _decode_file(f, path, keep=keep)


def _decode_file(f: BinaryIO, path: str, *, keep: bool) -> Decoded:
    head = f.read(8)
    f.seek(0)
    try:
        container = av.open(f, "r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise _open_failure(path, exc, head) from None
    with container:
        return _decode_stream(container, path, keep=keep)


def _decode_stream(container: av.container.InputContainer, path: str, *, keep: bool) -> Decoded:
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        raise AudioError(
            path, f"no audio stream ({_format_name(container, path)} with {'/'.join(kinds)} streams)"
        )
    stream = container.streams.audio[0]
    codec = stream.codec_context.name
    rate = 0
    channels = 0
    frames = 0
    blocks: list[np.ndarray] = []
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                if not frame.samples:
                    continue
                if rate == 0:
                    rate, channels = frame.sample_rate, frame.layout.nb_channels
                elif frame.sample_rate != rate:
                    raise AudioError(
                        path, f"sample rate changes mid-stream ({rate} Hz, then {frame.sample_rate} Hz)"
                    )
                samples = _float_samples(frame)
                if not np.isfinite(samples).all():
                    raise AudioError(path, "contains NaN/Inf samples")
                if keep:
                    blocks.append(samples.mean(axis=0, dtype=np.float32) if len(samples) > 1 else samples[0])
                frames += frame.samples
    except (av.FFmpegError, ValueError, OSError) as exc:
        at = f" at {frames / rate:.2f} s" if rate else ""
        raise AudioError(
            path, f"truncated or corrupt: {codec} decoding failed{at} ({_message(exc)})"
        ) from None
    if frames == 0 or rate <= 0:
        raise AudioError(path, "zero frames")
    declared = _declared_seconds(container, stream)
    decoded = frames / rate
    if declared is not None and declared - decoded > max(_SHORTFALL_S, _SHORTFALL_FRACTION * declared):
        raise AudioError(
            path, f"truncated: decoded {decoded:.2f} s of the {declared:.2f} s its index declares"
        )
    mono = np.concatenate(blocks) if keep else None
    return Decoded(frames, rate, channels, _format_name(container, path), codec.upper(), mono)


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    """The duration the container's index declares for `stream`, where that index is exact."""
    demuxers = set(container.format.name.split(","))
    if not demuxers & _INDEXED_DEMUXERS:
        return None
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None
