"""qwen_tasks.ingest.audio_files on real files written with numpy + soundfile: decoding, probing,
hashing, and every kind of bad file ingest must quarantine with a specific reason."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwen_tasks.errors import AudioError
from qwen_tasks.ingest.audio_files import check_file, load_waveform, probe, sha256_file


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def reason(fn, path: Path) -> str:
    with pytest.raises(AudioError) as info:
        fn(path)
    assert info.value.path == str(path)
    return info.value.reason


def test_load_waveform_resamples_stereo_to_mono_16k(tmp_path: Path) -> None:
    left = tone(1.0, 44100, 440.0)
    right = tone(1.0, 44100, 1000.0)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")

    wave = load_waveform(path)

    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == 16000
    spectrum = np.abs(np.fft.rfft(wave))
    peaks = sorted(np.argsort(spectrum)[-2:])  # 1 s at 16 kHz: bin index == Hz
    assert [int(p) for p in peaks] == [440, 1000]
    assert spectrum[440] == pytest.approx(spectrum[1000], rel=0.05)  # channel mean keeps both at half


def test_load_waveform_same_rate_is_exact_and_other_rates_work(tmp_path: Path) -> None:
    x = tone(0.5, 16000)
    path = tmp_path / "mono.flac"
    sf.write(path, x, 16000, subtype="PCM_24")
    expected, _ = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(load_waveform(path), expected)
    assert len(load_waveform(path, target_rate=8000)) == 4000


def test_probe_reads_header_of_long_audio(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(8000 * 180, dtype=np.int16), 8000)  # three minutes
    info = probe(path)
    assert (info.frames, info.sample_rate, info.channels, info.format, info.subtype) == (
        8000 * 180,
        8000,
        1,
        "WAV",
        "PCM_16",
    )
    assert info.duration_s == pytest.approx(180.0)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # crosses the 1 MiB chunk boundary
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_check_file_accepts_every_supported_format(tmp_path: Path) -> None:
    x = tone(1.0, 16000)
    for name, kwargs in {
        "a.wav": {},
        "a.flac": {},
        "a.ogg": {},
        "a.mp3": {"format": "MP3"},
        "f.wav": {"subtype": "FLOAT"},
    }.items():
        sf.write(tmp_path / name, x, 16000, **kwargs)
        checked = check_file(tmp_path / name)
        assert checked.sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert checked.probe.frames == 16000
        assert checked.size_bytes == (tmp_path / name).stat().st_size


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_bad_files_have_specific_reasons(tmp_path: Path) -> None:
    x = tone(1.0, 16000)
    cases: dict[str, str] = {}

    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty file (0 bytes)"
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    cases["notes.wav"] = "not an audio file: Format not recognised."
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    cases["zero.wav"] = "zero frames"
    bad = x.copy()
    bad[123] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    cases["nan.wav"] = "contains NaN/Inf samples"
    bad[123] = np.inf
    sf.write(tmp_path / "inf_double.wav", bad, 16000, subtype="DOUBLE")
    cases["inf_double.wav"] = "contains NaN/Inf samples"
    sf.write(tmp_path / "cut.wav", x, 16000)
    _truncate(tmp_path / "cut.wav", 0.5)
    cases["cut.wav"] = "truncated: header declares 32000 data bytes, file holds 15978"
    (tmp_path / "folder.wav").mkdir()
    cases["folder.wav"] = "is a directory"
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "nowhere.wav")
    cases["dangling.wav"] = "dangling symlink"
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    cases["loop.wav"] = "symlink loop"
    os.mkfifo(tmp_path / "pipe.wav")  # opening it for a decode would block forever
    cases["pipe.wav"] = "not a regular file"
    cases["absent.wav"] = "no such file"

    for name, expected in cases.items():
        assert reason(check_file, tmp_path / name) == expected, name


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_truncated_compressed_audio_is_caught(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"cut.{ext}"
    sf.write(path, tone(2.0, 16000), 16000, format=ext.upper() if ext == "mp3" else None)
    _truncate(path, 0.5)
    assert reason(check_file, path).startswith(("truncated: ", "truncated or malformed: "))


def test_load_waveform_rejects_bad_audio(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    assert reason(load_waveform, tmp_path / "empty.wav") == "empty file (0 bytes)"
    bad = tone(0.2, 16000)
    bad[5] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    assert reason(load_waveform, tmp_path / "nan.wav") == "contains NaN/Inf samples"
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    assert reason(load_waveform, tmp_path / "zero.wav") == "zero frames"
    (tmp_path / "junk.flac").write_bytes(b"fLaC not really")
    assert reason(load_waveform, tmp_path / "junk.flac").startswith("not an audio file: ")


def _reason_as_nobody(path: Path) -> str:
    """check_file in a forked child that dropped root, so file permissions apply (tests run as root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        message = "ok"
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                check_file(path)
            except AudioError as exc:
                message = exc.reason
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            message = f"child failed: {exc!r}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unreadable_file_is_permission_denied() -> None:
    folder = Path(tempfile.mkdtemp(prefix="qt-perm-"))  # in /tmp: traversable by an unprivileged user
    try:
        folder.chmod(0o755)
        path = folder / "secret.wav"
        sf.write(path, tone(0.2, 16000), 16000)
        path.chmod(0o000)
        if os.geteuid() == 0:
            assert _reason_as_nobody(path) == "permission denied"
        else:
            assert reason(check_file, path) == "permission denied"
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def _libsndfile_check(path: Path):  # type: ignore[no-untyped-def]
    """check_file's verdict with the canonical-WAV shortcut disabled: libsndfile reads every header."""
    from qwen_tasks.ingest import audio_files

    original = audio_files._canonical_wav
    audio_files._canonical_wav = lambda head, size: None
    try:
        return check_file(path)
    except AudioError as exc:
        return exc.reason
    finally:
        audio_files._canonical_wav = original


def _verdict(path: Path):  # type: ignore[no-untyped-def]
    try:
        return check_file(path)
    except AudioError as exc:
        return exc.reason


@pytest.mark.parametrize(
    ("channels", "rate", "subtype"),
    [
        (1, 16000, "PCM_16"),
        (2, 44100, "PCM_24"),
        (1, 8000, "PCM_U8"),  # written by hand below (soundfile will not write 8-bit WAV)
        (3, 22050, "PCM_U8"),
        (6, 48000, "PCM_32"),
        (2, 16000, "FLOAT"),
        (1, 16000, "ULAW"),
    ],
)
def test_canonical_wav_shortcut_agrees_with_libsndfile(
    tmp_path: Path, channels: int, rate: int, subtype: str
) -> None:
    """check_file judges canonical PCM WAV from its first bytes (no libsndfile); it must say exactly what
    libsndfile says, for the file as written and for every single-byte change of its header."""
    from qwen_tasks.ingest.audio_files import _canonical_wav

    path = tmp_path / "a.wav"
    if subtype == "PCM_U8":
        samples = bytes(range(128, 228)) * channels  # 100 frames
        fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels, channels, 8)
        header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
        path.write_bytes(header + b"data" + struct.pack("<I", len(samples)) + samples)
    else:
        sf.write(path, np.zeros((101, channels), dtype=np.float32) + 0.25, rate, subtype=subtype)
    data = path.read_bytes()
    expected = _libsndfile_check(path)
    assert _verdict(path) == expected
    shortcut = _canonical_wav(data, len(data))
    assert (shortcut is not None) == subtype.startswith("PCM_")
    if shortcut is not None:
        assert shortcut == expected.probe
    rng = np.random.default_rng(channels * rate)
    variants = [data[:-1], data[:-2], data + b"\0", data + b"\0\0", data[:44], data[:43]]
    for offset in range(44):
        for value in {0, 1, 255, data[offset] ^ 1, data[offset] ^ 0x80, int(rng.integers(256))}:
            variants.append(data[:offset] + bytes([value]) + data[offset + 1 :])
    for variant in variants:
        path.write_bytes(variant)
        assert _verdict(path) == _libsndfile_check(path), variant[:44]
