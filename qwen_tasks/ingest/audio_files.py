"""Reading audio files: cheap probes for ingest, full decodes for the model stage.

Every failure becomes `AudioError(path, reason)` with a reason a person can act on ("empty file
(0 bytes)", "truncated: ..."), because one bad file must be quarantined or skipped, never crash a batch.
Ingest calls `check_file` (stat + streamed sha256 + header probe + blockwise sample scan, one open per
file); the model stage calls `load_ingested` (the file must still be the one ingest admitted: under its
allowed root, same size and mtime) or `load_waveform` (mono float32 at the model's rate).

Two readers: libsndfile (through soundfile) for its own formats (WAV, FLAC, OGG, MP3, AIFF...), which it
probes without decoding, and ffmpeg (through PyAV, `ffmpeg_audio`) for the rest: the extensions in
`FFMPEG_EXTENSIONS`, and any file libsndfile does not recognise. `reader_for` says which comes first.

The allowed-roots rule (`within_roots`) and the stored form of a path (`display_path`) live here too,
so ingest (which admits files) and labelling (which re-checks them when it reads) share one definition.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import soundfile as sf
import soxr

from qwen_tasks.errors import AudioError
from qwen_tasks.records import TARGET_SAMPLE_RATE, RecordedPath, is_url

if TYPE_CHECKING:
    from qwen_tasks.ingest import ffmpeg_audio

HASH_CHUNK = 1 << 20  # 1 MiB reads: large enough for hashlib to release the GIL, small enough for memory
SCAN_BLOCK_FRAMES = 1 << 16  # frames per block when scanning samples; keeps memory flat on long files

# Containers whose integer/companded samples cannot hold NaN/Inf and whose truncation shows in the header,
# so decoding them at ingest would tell us nothing the probe did not.
_HEADER_CHECKED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "AIFF", "CAF"})
_NON_FLOAT_SUBTYPE = re.compile(r"^(PCM_(S8|U8|16|24|32)|ULAW|ALAW)$")
# libsndfile's log says "data : 32000 (should be 15978)" when a header promises more bytes than exist.
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# The canonical 44-byte PCM WAV header (RIFF, a 16-byte `fmt ` chunk, then `data`): see _canonical_wav.
_CANONICAL_WAV = struct.Struct("<4sI4s4sIHHIIHH4sI")
_PCM_SUBTYPES = {8: "PCM_U8", 16: "PCM_16", 24: "PCM_24", 32: "PCM_32"}
_MAX_CHANNELS = 1024  # libsndfile's SF_MAX_CHANNELS: more is "Too many channels specified"

# What libsndfile reads itself: these keep the canonical-WAV fast path and the header-only probe.
LIBSNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".caf", ".w64")
# Recording formats libsndfile cannot read, sent straight to ffmpeg (phones and messengers: m4a/aac,
# opus/webm, amr/3gp; Windows: wma; video containers: their audio track). A file with any other
# extension, named explicitly or by a manifest, is tried with libsndfile and then with ffmpeg.
FFMPEG_EXTENSIONS = (
    ".m4a", ".m4b", ".aac", ".opus", ".webm", ".weba", ".mka", ".amr", ".3gp", ".3ga", ".wma", ".asf", ".mp4",
    ".ac3", ".wv", ".ape", ".mp2",
)  # fmt: skip
# libsndfile's message for a file it has no reader for (as opposed to a known format that is broken).
_NOT_RECOGNISED = "Format not recognised"


@dataclass(frozen=True)
class AudioProbe:
    """What the file header says, read without decoding the samples."""

    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str | None

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class CheckedAudio:
    """A file that passed every ingest check: its identity (sha256) and what it holds."""

    path: str
    sha256: str
    size_bytes: int
    mtime_ns: int | None  # an object's last-modified time; None when its storage does not say
    probe: AudioProbe
    etag: str | None = None  # an object's entity tag (URL paths only)


def path_prefix(folder: str) -> str:
    """`folder` with one trailing separator: a prefix that matches the folder's contents, not its siblings."""
    return folder if folder.endswith(os.sep) else folder + os.sep


def within_roots(real: str, roots: Sequence[str]) -> bool:
    """True when `real` (a path with symlinks resolved) is one of `roots` or lies under one of them."""
    return any(real == r or real.startswith(path_prefix(r)) for r in roots)


def display_path(path: str) -> str:
    """A path as PostgreSQL text can hold it: verbatim when UTF-8, else each undecodable byte as \\xNN.

    Python gives such names as str with surrogate escapes; the database keeps the exact bytes beside
    this form (audio_file.path_bytes), so nothing is lost.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def os_error_reason(path: str | Path, exc: OSError) -> str:
    """A short, specific reason for an OSError met while opening or reading `path`."""
    code = exc.errno
    if code == errno.ELOOP:
        return "symlink loop"
    if code == errno.ENOENT:
        return "dangling symlink" if os.path.islink(path) else "no such file"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EISDIR:
        return "is a directory"
    return f"cannot read: {exc.strerror or exc}"


def _libsndfile_message(exc: Exception) -> str:
    """libsndfile's own words without the "Error opening '<path>': " prefix (the path is reported anyway)."""
    text = str(exc).strip()
    text = re.sub(r"^Error opening .*?: ", "", text)
    text = re.sub(r"^Error\s*:\s*", "", text)
    return re.sub(r"\s+", " ", text) or type(exc).__name__


def _open_failure(path: str, exc: Exception) -> AudioError:
    """libsndfile could not open the file: not audio at all, or a known format cut short."""
    message = _libsndfile_message(exc)
    if "malformed" in message:
        return AudioError(path, f"truncated or malformed: {message}")
    return AudioError(path, f"not an audio file: {message}")


def _probe_open(sound: sf.SoundFile, path: str) -> AudioProbe:
    """Header checks on an open file: truncation first (more specific than 'zero frames')."""
    extra = sound.extra_info or ""
    short = _SHORT_DATA.search(extra)
    if short and int(short.group(1)) > int(short.group(2)):
        raise AudioError(
            path,
            f"truncated: header declares {short.group(1)} data bytes, file holds {short.group(2)}",
        )
    if "ended unexpectedly" in extra:
        raise AudioError(path, "truncated: stream ends without an end-of-stream marker")
    if sound.samplerate <= 0 or sound.channels <= 0:
        raise AudioError(path, f"invalid header: rate {sound.samplerate}, channels {sound.channels}")
    if sound.frames <= 0:
        raise AudioError(path, "zero frames")
    return AudioProbe(
        frames=int(sound.frames),
        sample_rate=int(sound.samplerate),
        channels=int(sound.channels),
        format=str(sound.format),
        subtype=str(sound.subtype) if sound.subtype else None,
    )


def _canonical_wav(head: bytes, size: int) -> AudioProbe | None:
    """The probe of a canonical PCM WAV file from its first bytes and its length, or None for anything else.

    Canonical means exactly what most tools write: `RIFF` whose size covers the whole file, `WAVE`, a
    16-byte `fmt ` chunk with format 1 (integer PCM) at 8/16/24/32 bits, consistent block align and
    byte rate, then a `data` chunk of an even, non-zero number of whole frames that ends where the file
    ends. libsndfile reads such a header to the same facts with nothing to complain about (no truncation,
    no padding note), and integer PCM needs no sample scan, so the answer is the one check_file would get
    from libsndfile, without its ~30 small reads and seeks and soundfile's Python overhead per file.
    Every other file (other chunks, extensible format, floats, a cut or padded data chunk) returns None
    and goes through libsndfile as before. tests/ingest/test_audio_files.py compares the two.
    """
    if len(head) < _CANONICAL_WAV.size:
        return None
    riff, riff_size, wave, fmt, fmt_size, tag, channels, rate, byte_rate, align, bits, data, data_size = (
        _CANONICAL_WAV.unpack_from(head)
    )
    subtype = _PCM_SUBTYPES.get(bits)
    if (
        riff != b"RIFF"
        or wave != b"WAVE"
        or fmt != b"fmt "
        or data != b"data"
        or fmt_size != 16
        or tag != 1
        or subtype is None
        or not 0 < channels <= _MAX_CHANNELS
        or rate <= 0
        or align != channels * (bits // 8)
        or byte_rate != rate * align
        or riff_size != size - 8
        or data_size != size - 44
        or data_size <= 0
        or data_size % 2
        or data_size % align
    ):
        return None
    return AudioProbe(
        frames=data_size // align, sample_rate=rate, channels=channels, format="WAV", subtype=subtype
    )


def _open_regular(path: str, *, raise_not_found: bool = False) -> tuple[int, os.stat_result]:
    """Open `path` read-only and make sure it is a non-empty regular file (FIFOs would block forever).

    `raise_not_found`: let FileNotFoundError through (labelling tells a deleted file from lost storage).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if raise_not_found and isinstance(exc, FileNotFoundError):
            raise
        raise AudioError(path, os_error_reason(path, exc)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise AudioError(path, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise AudioError(path, "not a regular file")
        if st.st_size == 0:
            raise AudioError(path, "empty file (0 bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def reader_for(path: str) -> str:
    """'ffmpeg' for the extensions libsndfile cannot read (FFMPEG_EXTENSIONS), else 'libsndfile' (which
    hands over to ffmpeg when it does not recognise the file: `_ffmpeg_instead`)."""
    return "ffmpeg" if os.path.splitext(path)[1].lower() in FFMPEG_EXTENSIONS else "libsndfile"


def _ffmpeg_probe(fd: int, path: str) -> AudioProbe:
    """Decode with ffmpeg to the end (the only honest frame count for these formats; see ffmpeg_audio)."""
    from qwen_tasks.ingest import ffmpeg_audio  # imported on first use: PyAV adds ~60 ms to start-up

    return _as_probe(ffmpeg_audio.decode(fd, path, keep=False))


def _ffmpeg_instead(
    fd: int | BinaryIO, path: str, failure: AudioError, *, keep: bool
) -> ffmpeg_audio.Decoded:
    """libsndfile failed to open the file: when it did not recognise the format at all (a .wav that is
    really an M4A, a file without extension), ffmpeg may; otherwise `failure` stands. Should ffmpeg not
    read it either, libsndfile's reason is kept unless ffmpeg's says more (truncated, no audio stream)."""
    from qwen_tasks.ingest import ffmpeg_audio

    if _NOT_RECOGNISED not in failure.reason:
        raise failure
    try:
        return ffmpeg_audio.decode(fd, path, keep=keep)
    except AudioError as exc:
        if exc.reason.startswith("not an audio file"):
            raise failure from None
        raise


def probe(path: str | Path) -> AudioProbe:
    """Header facts (frames, rate, channels, format) without decoding for libsndfile's formats; the
    others are decoded (their headers hold no reliable frame count). AudioError if unusable."""
    path = os.fspath(path)
    fd, _ = _open_regular(path)
    try:
        if reader_for(path) == "ffmpeg":
            return _ffmpeg_probe(fd, path)
        try:
            with sf.SoundFile(fd, closefd=False) as sound:
                return _probe_open(sound, path)
        except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError) as exc:
            failure = _open_failure(path, exc)
        return _as_probe(_ffmpeg_instead(fd, path, failure, keep=False))
    finally:
        os.close(fd)


def _as_probe(d: ffmpeg_audio.Decoded) -> AudioProbe:
    return AudioProbe(
        frames=d.frames, sample_rate=d.sample_rate, channels=d.channels, format=d.format, subtype=d.subtype
    )


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks (flat memory for hour-long files)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise AudioError(path, os_error_reason(path, exc)) from None


def needs_sample_scan(info: AudioProbe) -> bool:
    """True when decoding can reveal something the header cannot: float samples (NaN/Inf) or a
    compressed stream (FLAC/OGG/MP3 truncation shows only while decoding)."""
    if info.format not in _HEADER_CHECKED_FORMATS:
        return True
    return not _NON_FLOAT_SUBTYPE.match(info.subtype or "")


def _scan_samples(sound: sf.SoundFile, path: str, info: AudioProbe) -> None:
    """Decode blockwise (memory stays flat) and reject NaN/Inf samples or a stream that stops early."""
    decoded = 0
    try:
        # read() until it returns nothing: SoundFile.blocks() pads its count to the header's frames, which
        # would hide a stream that stops early.
        while len(block := sound.read(SCAN_BLOCK_FRAMES, dtype="float32", always_2d=True)):
            if not np.isfinite(block).all():
                raise AudioError(path, "contains NaN/Inf samples")
            decoded += len(block)
    except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError) as exc:
        raise AudioError(path, f"truncated: {_libsndfile_message(exc)}") from None
    if decoded == 0:
        raise AudioError(path, "zero frames")
    if decoded < info.frames:
        raise AudioError(path, f"truncated: decoded {decoded} of {info.frames} frames")


def check_file(path: str | Path) -> CheckedAudio:
    """Everything ingest needs to accept a file, with one open: regular non-empty file, streamed sha256,
    a readable audio header with frames, and (where it can matter) finite samples to the end.

    A canonical PCM WAV file is judged from the bytes already read for the hash (`_canonical_wav`);
    anything else is opened with libsndfile, or decoded with ffmpeg (`reader_for`), on the same
    descriptor."""
    path = os.fspath(path)
    fd, st = _open_regular(path)
    try:
        try:
            head = os.read(fd, HASH_CHUNK)
            digest = hashlib.sha256(head)
            size = len(head)
            while chunk := os.read(fd, HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except OSError as exc:
            raise AudioError(path, os_error_reason(path, exc)) from None
        sha = digest.hexdigest()
        info = _canonical_wav(head, size) if size == st.st_size else None
        if info is None:
            info = _check_open(fd, path)
    finally:
        os.close(fd)
    return CheckedAudio(path=path, sha256=sha, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns, probe=info)


def check_object(url: str, listed_size: int | None = None) -> CheckedAudio:
    """check_file for an object in storage (`sources`): streamed once into a temporary file while it is
    hashed, then judged from that very copy (canonical WAV from the bytes read, else libsndfile/ffmpeg on
    the copy), so the object is downloaded once and what is probed is what was hashed."""
    from qwen_tasks.ingest import sources

    with tempfile.TemporaryFile(prefix="qwen-tasks-object-") as tmp:
        got = sources.download(url, tmp, listed_size)
        tmp.flush()
        size = got.info.size
        if size == 0:
            raise AudioError(url, "empty object (0 bytes)")
        info = _canonical_wav(got.head, size) or _check_open(tmp.fileno(), url)
    return CheckedAudio(url, got.sha256, size, got.info.mtime_ns, info, got.info.etag)


def _check_open(fd: int, path: str) -> AudioProbe:
    """The probe (and, where it can matter, the sample scan) of a file that is not canonical WAV."""
    if reader_for(path) == "ffmpeg":
        return _ffmpeg_probe(fd, path)
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        with sf.SoundFile(fd, closefd=False) as sound:
            info = _probe_open(sound, path)
            if needs_sample_scan(info):
                _scan_samples(sound, path, info)
            return info
    except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError) as exc:
        failure = _open_failure(path, exc)
    return _as_probe(_ffmpeg_instead(fd, path, failure, keep=False))


def load_waveform(path: str | Path, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Decode a whole file to mono float32 at `target_rate` (channel mean, soxr high quality).

    The model stage calls this (through `load_ingested`); it raises AudioError (never returns empty or
    non-finite audio) so one bad clip fails alone instead of poisoning a batch.
    """
    path = os.fspath(path)
    if target_rate <= 0:
        raise ValueError(f"target_rate must be > 0, got {target_rate}")
    fd, _ = _open_regular(path)
    try:
        return _decode_fd(fd, path, target_rate)
    finally:
        os.close(fd)


def _decode_fd(fd: int | BinaryIO, path: str, target_rate: int) -> np.ndarray:
    """Decode from an open descriptor, or from the file's bytes in memory (`load_ingested`)."""
    if reader_for(path) == "ffmpeg":
        rate, mono = _ffmpeg_mono(fd, path, None)
    else:
        try:
            with sf.SoundFile(fd, closefd=False) as sound:
                rate = int(sound.samplerate)
                data = sound.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError) as exc:
            rate, mono = _ffmpeg_mono(fd, path, _open_failure(path, exc))
        else:
            if data.shape[0] == 0:
                raise AudioError(path, "zero frames")
            if not np.isfinite(data).all():
                raise AudioError(path, "contains NaN/Inf samples")
            mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise AudioError(path, f"zero samples after resampling from {rate} Hz to {target_rate} Hz")
    return mono


def _ffmpeg_mono(fd: int | BinaryIO, path: str, failure: AudioError | None) -> tuple[int, np.ndarray]:
    """(rate, mono float32) decoded by ffmpeg: directly (`failure` None) or after libsndfile failed."""
    from qwen_tasks.ingest import ffmpeg_audio

    d = (
        ffmpeg_audio.decode(fd, path, keep=True)
        if failure is None
        else _ffmpeg_instead(fd, path, failure, keep=True)
    )
    assert d.mono is not None  # keep=True
    return d.sample_rate, d.mono


def _real_path_of(fd: int, path: str) -> str:
    """Where an open file really is. On Linux /proc names the very inode we hold, so a file swapped for a
    symlink after this point cannot slip through; elsewhere, the resolved path."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _configured_roots() -> list[str]:
    from qwen_tasks.config import get_settings

    return [str(r) for r in get_settings().allowed_roots]


def location_problem(recorded: RecordedPath, real: str) -> str | None:
    """Why a registered file whose real location is now `real` may not be read, or None when it may.

    It must lie under the root that admitted it at its latest ingest (audio_file.root) and, when
    QWEN_TASKS_ALLOWED_ROOTS is set now, under one of those too: an operator can narrow the roots, never
    widen them. A row ingested before roots were recorded (migration 0006; the next ingest records them)
    is held to QWEN_TASKS_ALLOWED_ROOTS, or when that is unset, to the real location of its own folder.
    """
    configured = _configured_roots()
    shown = display_path(real)
    if recorded.root is not None:
        if not within_roots(real, [recorded.root]):
            return f"now resolves to {shown}, outside its allowed root {display_path(recorded.root)}"
    elif not configured and not is_url(real):
        folder = os.path.realpath(os.path.dirname(recorded.fs_path))
        if not within_roots(real, [folder]):
            return f"now resolves to {shown}, outside its folder {display_path(folder)}"
    if configured and not within_roots(real, configured):
        return f"now resolves to {shown}, outside QWEN_TASKS_ALLOWED_ROOTS"
    return None


def load_ingested(recorded: RecordedPath, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """`load_waveform` for a file registered by ingest, read only if it is still the file ingest admitted.

    Ingest judged the path once; a file replaced afterwards (say, by a same-size symlink to a file outside
    the allowed roots) must not be labelled. So, on the open file: its real location must pass
    `location_problem`, its size and mtime must be those ingest recorded, and (when `recorded.sha256` is
    known) the bytes read must hash to it: the bytes labelled are the bytes ingested. Raises AudioError(path,
    reason) naming what differs, or FileNotFoundError when the file is gone (a deleted file and unmounted
    storage look alike; the caller decides).
    """
    if target_rate <= 0:
        raise ValueError(f"target_rate must be > 0, got {target_rate}")
    path = recorded.path  # the stored, printable form: messages end up in label_failure
    if is_url(path):
        return _load_object(recorded, target_rate)
    fs_path = recorded.fs_path
    try:
        fd, st = _open_regular(fs_path, raise_not_found=True)
    except AudioError as exc:
        raise AudioError(path, exc.reason) from None
    try:
        problem = location_problem(recorded, _real_path_of(fd, fs_path))
        if problem:
            raise AudioError(path, f"{problem}; not read")
        if recorded.size_bytes is not None and st.st_size != recorded.size_bytes:
            raise AudioError(
                path, f"changed since ingest ({st.st_size} bytes, was {recorded.size_bytes}); re-run ingest"
            )
        if recorded.mtime_ns is not None and st.st_mtime_ns != recorded.mtime_ns:
            raise AudioError(path, "changed since ingest (modification time differs); re-run ingest")
        if recorded.sha256 is None:
            return _decode_fd(fd, path, target_rate)
        # Size and mtime can be kept (os.utime) by whoever rewrites the file: the content itself must be
        # what ingest hashed. The file is read whole once; the hash and the decoder use those bytes.
        data = _read_whole(fd, path, st.st_size)
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded.sha256:
            raise AudioError(
                path, f"content changed since ingest: sha256 {actual} != {recorded.sha256}; re-run ingest"
            )
        return _decode_fd(io.BytesIO(data), path, target_rate)
    finally:
        os.close(fd)


def _load_object(recorded: RecordedPath, target_rate: int) -> np.ndarray:
    """load_ingested for an object in storage: the URL must still lie under its allowed root (and under
    QWEN_TASKS_ALLOWED_ROOTS when set), and the bytes decoded are the bytes ingest hashed, from the local
    object cache or downloaded once (`sources.fetch_verified`); a URL has no symlinks to resolve again."""
    from qwen_tasks.ingest import sources

    problem = location_problem(recorded, recorded.path)
    if problem:
        raise AudioError(recorded.path, f"{problem}; not read")
    if recorded.sha256 is None:  # cannot happen for an ok row; refuse rather than read unchecked bytes
        raise AudioError(recorded.path, "no sha256 recorded by ingest; re-run ingest")
    data = sources.fetch_verified(recorded.path, recorded.sha256, recorded.size_bytes)
    return _decode_fd(io.BytesIO(data), recorded.path, target_rate)


def _read_whole(fd: int, path: str, size: int) -> bytes:
    """The file's `size` bytes (one read() call for a regular file, so no copy joining chunks); a file
    that is shorter or longer than that by now is being rewritten, which is reported as a change."""
    try:
        chunks = [os.read(fd, size)]
        n = len(chunks[0])
        while n < size and (chunk := os.read(fd, size - n)):
            chunks.append(chunk)
            n += len(chunk)
        extra = os.read(fd, 1)
    except OSError as exc:
        raise AudioError(path, os_error_reason(path, exc)) from None
    if n != size or extra:
        raise AudioError(path, "changed since ingest (its size changed while it was read); re-run ingest")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
