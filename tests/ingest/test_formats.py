"""The recording formats libsndfile cannot read (m4a, ADTS aac, opus, webm, amr, wma, mp4 audio tracks),
read through PyAV: real files encoded here with the ffmpeg bundled in the `av` wheel, the real ingest
and database, and the real labelling path on the tiny model. No mocks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.errors import AudioError
from qwen_tasks.ingest.audio_files import check_file, load_waveform
from qwen_tasks.ingest.register import ingest
from qwen_tasks.store import schema


@dataclass(frozen=True)
class Spec:
    """One recording format: the file extension, ffmpeg's muxer and encoder, and what to expect."""

    ext: str
    muxer: str
    encoder: str
    rate: int
    layout: str
    seconds: float
    format: str  # audio.format as ingest stores it
    subtype: str  # audio.subtype: the codec ffmpeg decodes it with
    bit_rate: int | None = None


SPECS = [
    Spec(".m4a", "ipod", "aac", 44100, "stereo", 1.5, "M4A", "AAC"),
    Spec(".aac", "adts", "aac", 22050, "mono", 1.0, "AAC", "AAC"),
    Spec(".opus", "opus", "libopus", 48000, "mono", 2.0, "OGG", "OPUS"),
    Spec(".webm", "webm", "libopus", 48000, "stereo", 1.2, "WEBM", "OPUS"),
    Spec(".amr", "amr", "libopencore_amrnb", 8000, "mono", 1.6, "AMR", "AMRNB"),
    Spec(".wma", "asf", "wmav2", 22050, "mono", 1.4, "ASF", "WMAV2", bit_rate=64000),
    Spec(".mp4", "mp4", "aac", 48000, "mono", 1.0, "MP4", "AAC"),  # with a video track before the audio
]


def encode(
    path: Path, spec: Spec, *, freq: float = 440.0, video: bool = False, options: dict[str, str] | None = None
) -> Path:
    """Encode a tone of `spec.seconds` with PyAV (frame by frame, as a recorder would); `options`: the
    muxer's."""
    with av.open(str(path), "w", format=spec.muxer, options=options or {}) as container:
        vstream = None
        if video:  # a real video track, added first so that the audio is not stream 0
            vstream = container.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 32, 32, "yuv420p"
        stream = container.add_stream(spec.encoder, rate=spec.rate, layout=spec.layout)
        if spec.bit_rate:
            stream.codec_context.bit_rate = spec.bit_rate
        ctx = stream.codec_context
        step = ctx.frame_size or 1024
        total = int(spec.seconds * spec.rate)
        channels = ctx.layout.nb_channels
        t = np.arange(total) / spec.rate
        tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        for start in range(0, total, step):
            block = np.zeros(step, dtype=np.float32)
            chunk = tone[start : start + step]
            block[: len(chunk)] = chunk
            planes = np.tile(block, (channels, 1))
            if ctx.format.name.startswith("s16"):
                planes = (planes * 32767).astype(np.int16)
            if not ctx.format.is_planar:
                planes = planes.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(planes, format=ctx.format.name, layout=spec.layout)
            frame.sample_rate, frame.pts = spec.rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if vstream is not None:
            for i in range(int(spec.seconds * 10)):
                image = np.full((32, 32, 3), i * 20 % 256, dtype=np.uint8)
                picture = av.VideoFrame.from_ndarray(image, format="rgb24")
                picture.pts = i
                container.mux(vstream.encode(picture))
            container.mux(vstream.encode(None))
    return path


def write_formats(folder: Path) -> dict[str, Path]:
    """One file per format (distinct tones, so distinct bytes), plus files a scan must skip."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        s.ext: encode(folder / f"rec{s.ext}", s, freq=300.0 + 50 * i, video=s.ext == ".mp4")
        for i, s in enumerate(SPECS)
    }
    (folder / "notes.txt").write_text("not audio\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "readme.TXT").write_text("not audio either\n")
    (folder / "sub" / "Makefile").write_text("all:\n")
    (folder / ".hidden").write_text("dotfile\n")
    return paths


def reason(path: Path) -> str:
    with pytest.raises(AudioError) as err:
        check_file(path)
    return err.value.reason


def test_bundled_ffmpeg_has_the_encoders_these_tests_use() -> None:
    """If a future `av` wheel drops one, say which instead of failing obscurely in encode()."""
    missing = [s.encoder for s in SPECS if s.encoder not in av.codecs_available]
    assert not missing, f"the av wheel's ffmpeg has no encoder {missing}"


@pytest.mark.parametrize("spec", SPECS, ids=[s.ext for s in SPECS])
def test_check_file_and_load_waveform_read_each_format(tmp_path: Path, spec: Spec) -> None:
    path = encode(tmp_path / f"clip{spec.ext}", spec, video=spec.ext == ".mp4")
    checked = check_file(path)
    p = checked.probe
    assert (p.format, p.subtype, p.sample_rate) == (spec.format, spec.subtype, spec.rate)
    assert p.channels == (2 if spec.layout == "stereo" else 1)
    assert p.frames > 0
    # decoded length: the tone plus at most the codec's padding/priming (a frame or two), minus WMA preroll
    assert p.duration_s == pytest.approx(spec.seconds, abs=0.1)
    wave = load_waveform(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) / 16000 == pytest.approx(p.duration_s, abs=0.01)
    assert 0.1 < float(np.abs(wave).max()) < 1.0  # the tone survived (not silence, not clipped noise)


def test_bad_files_are_quarantined_with_a_reason(tmp_path: Path) -> None:
    m4a, opus, webm = SPECS[0], SPECS[2], SPECS[3]
    # A phone writes the MP4 index (moov) last, so a cut recording has none.
    cut = encode(tmp_path / "cut.m4a", m4a).read_bytes()
    (tmp_path / "cut.m4a").write_bytes(cut[: len(cut) // 2])
    assert reason(tmp_path / "cut.m4a").startswith("truncated or malformed: MP4/M4A container")
    # With the index first (faststart), the cut shows while decoding.
    path = tmp_path / "cut_faststart.m4a"
    data = encode(tmp_path / "fast.m4a", m4a, options={"movflags": "faststart"}).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert reason(path).startswith("truncated")
    # Junk over the middle of an Ogg Opus stream: the demuxer loses sync and stops early.
    data = bytearray(encode(tmp_path / "src.opus", opus).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    (tmp_path / "corrupt.opus").write_bytes(bytes(data))
    assert reason(tmp_path / "corrupt.opus").startswith("truncated: decoded ")
    data = encode(tmp_path / "src.webm", webm).read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.webm").startswith("truncated: decoded ")
    (tmp_path / "text.m4a").write_text("not a recording\n" * 50)
    assert reason(tmp_path / "text.m4a").startswith("not an audio file: ffmpeg cannot read it")
    # a video without an audio track
    with av.open(str(tmp_path / "silent.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert reason(tmp_path / "silent.mp4") == "no audio stream (MP4 with video streams)"
    for name in ("cut.m4a", "cut_faststart.m4a", "corrupt.opus", "cut.webm"):
        assert "\n" not in reason(tmp_path / name)


def test_files_libsndfile_does_not_recognise_go_to_ffmpeg(tmp_path: Path) -> None:
    """A file whose extension says nothing (or lies) is tried with libsndfile, then with ffmpeg."""
    encode(tmp_path / "recording", SPECS[0])  # an M4A without extension
    encode(tmp_path / "really_aac.wav", SPECS[1])
    probe = check_file(tmp_path / "recording").probe
    assert (probe.format, probe.subtype, probe.channels) == ("MOV", "AAC", 2)
    assert check_file(tmp_path / "really_aac.wav").probe.subtype == "AAC"
    assert len(load_waveform(tmp_path / "recording")) / 16000 == pytest.approx(1.5, abs=0.1)
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    assert reason(tmp_path / "notes.wav") == "not an audio file: Format not recognised."  # libsndfile's words


def test_ingest_a_folder_of_recordings(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "phone"
    write_formats(folder)
    data = encode(tmp_path / "cut.m4a", SPECS[0]).read_bytes()
    (folder / "cut.m4a").write_bytes(data[: len(data) // 2])
    data = bytearray(encode(tmp_path / "corrupt.opus", SPECS[2]).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 300] = b"\xff" * 300
    (folder / "corrupt.opus").write_bytes(bytes(data))
    (folder / "labels.jsonl").write_text("")  # inside a scanned folder, not named: skipped like any file
    manifest = folder / "m.jsonl"  # a manifest named as a PATH is not a skipped file, even in the folder
    manifest.write_text(json.dumps({"audio": str(folder / "rec.m4a"), "question": "cry?", "gt": "no"}) + "\n")

    summary = ingest(engine, [folder, manifest])
    assert summary.new == len(SPECS), summary.quarantine
    assert summary.quarantined == 2
    assert summary.skipped == {
        ".txt": 2,
        "(none)": 2,
        ".jsonl": 1,
    }  # notes.txt, readme.TXT, Makefile, .hidden
    reasons = {Path(q["path"]).name: q["reason"] for q in summary.quarantine}
    assert reasons["cut.m4a"].startswith("truncated or malformed: ")
    assert reasons["corrupt.opus"].startswith("truncated")
    assert summary.to_dict()["skipped"] == summary.skipped

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.audio_file.c.path, schema.audio).join(
                schema.audio, schema.audio.c.id == schema.audio_file.c.audio_id
            )
        ).all()
    by_ext = {Path(r.path).suffix: r for r in rows}
    for spec in SPECS:
        row = by_ext[spec.ext]
        assert (row.format, row.subtype, row.sample_rate) == (spec.format, spec.subtype, spec.rate)
        assert row.frames > 0 and row.duration_s == pytest.approx(spec.seconds, abs=0.1), spec.ext
        assert row.duration_s == pytest.approx(row.frames / row.sample_rate)

    again = ingest(engine, [folder])  # unchanged: not decoded again; m.jsonl, not named now, is skipped
    assert (again.new, again.unchanged, again.quarantined) == (0, len(SPECS), 2)
    assert again.skipped == {".txt": 2, "(none)": 2, ".jsonl": 2}


def test_cli_reports_skipped_files(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    encode(folder / "a.opus", SPECS[2])
    for name in ("x.txt", "y.txt", "z.PDF", "README"):
        (folder / name).write_text("-")
    runner = CliRunner()
    done = runner.invoke(app, ["ingest", str(folder), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["skipped"] == {".txt": 2, ".pdf": 1, "(none)": 1}
    done = runner.invoke(app, ["ingest", str(folder)])
    assert done.exit_code == 0, done.output
    assert "skipped 4 files that are not audio by extension: .txt 2, (none) 1, .pdf 1" in done.stderr


@pytest.mark.slow
def test_every_format_labels_on_the_tiny_model(engine: Engine, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real labelling path (plan, jobs, load_ingested, the tiny Qwen2-Audio on CPU) over one file per
    format: each ingested clip gets its cry_answer row, none fails."""
    from qwen_tasks.labelling import worker
    from qwen_tasks.labelling.options import LabelOptions

    folder = tmp_path / "label"
    write_formats(folder)
    summary = ingest(engine, [folder])
    assert summary.new == len(SPECS)
    options = LabelOptions.from_mapping({"tasks": ["cry"], "model": str(tiny_model_dir), "device": "cpu"})
    result = worker.label(engine, options)
    assert (result.labelled, result.failed) == (len(SPECS), 0), result.errors
    with engine.connect() as conn:
        audio_ids = set(conn.execute(sa.select(schema.audio.c.id)).scalars())
        answered = set(conn.execute(sa.select(schema.cry_answer.c.audio_id)).scalars())
        failures = conn.execute(sa.select(schema.label_failure.c.error)).scalars().all()
    assert failures == []
    assert answered == audio_ids and len(audio_ids) == len(SPECS)
