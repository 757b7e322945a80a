"""Ingest and reading at the trust boundary: manifests judged by their real path when opened, manifest
questions held to the `question` option's rule, and the labelling read checked against the ingested
sha256 on both readers (libsndfile and PyAV)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from sqlalchemy.engine import Engine

from qwen_tasks.errors import AudioError
from qwen_tasks.ingest.audio_files import load_ingested
from qwen_tasks.ingest.manifests import ManifestError, read_manifest
from qwen_tasks.ingest.register import ingest
from qwen_tasks.records import RecordedPath


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)


def test_a_manifest_symlinked_out_of_the_roots_is_not_read(tmp_path: Path) -> None:
    """The root check is made on the path that is opened, not only on the name ingest was given."""
    outside = tmp_path / "outside" / "secret.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"audio": "a.wav", "text": "secret"}\n')
    link = tmp_path / "root" / "m.jsonl"
    link.parent.mkdir()
    link.symlink_to(outside)
    (entry,) = read_manifest(link, roots=[str(tmp_path / "root")])
    assert entry == ManifestError(str(link), 0, "outside allowed roots")
    (item,) = read_manifest(link)  # without configured roots: as before
    assert item.reference_text == "secret"  # type: ignore[union-attr]


def test_manifest_questions_follow_the_question_rule(engine: Engine, tmp_path: Path) -> None:
    lines = [
        {"question": "Is a baby crying?", "audio": "a.wav", "gt": "yes"},
        {"question": "x" * 1001, "audio": "b.wav", "gt": "no"},
        {"question": "Crying?\u0007", "audio": "c.wav", "gt": "no"},
    ]
    manifest = tmp_path / "cry.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = ingest(engine, [], manifests=[(manifest, "aqa")])
    errors = {e["line"]: e["reason"] for e in summary.manifest_errors}
    assert summary.manifest_items == 1
    assert errors == {
        2: '"question" is longer than 1000 characters (1001)',
        3: '"question" contains a control character (U+0007 at 7)',
    }


def encode_aac(path: Path, seconds: float = 1.0, rate: int = 22050) -> Path:
    """An ADTS AAC file (read through PyAV: ffmpeg_audio), a tone encoded frame by frame."""
    with av.open(str(path), "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        ctx = stream.codec_context
        step = ctx.frame_size or 1024
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
        for start in range(0, len(tone), step):
            block = np.zeros((1, step), dtype=np.float32)
            chunk = tone[start : start + step]
            block[0, : len(chunk)] = chunk
            frame = av.AudioFrame.from_ndarray(block, format=ctx.format.name, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("reader", ["libsndfile", "ffmpeg"])
def test_load_ingested_checks_the_sha256_of_the_bytes_it_decodes(tmp_path: Path, reader: str) -> None:
    if reader == "ffmpeg":
        path = encode_aac(tmp_path / "a.aac")
    else:
        import soundfile as sf

        path = tmp_path / "a.wav"
        sf.write(path, np.linspace(-0.5, 0.5, 16000, dtype=np.float32), 16000, subtype="PCM_16")
    st = path.stat()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    recorded = RecordedPath(str(path), st.st_size, st.st_mtime_ns, str(tmp_path), None, sha)
    assert load_ingested(recorded).size > 0

    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # other content, same size, same mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(AudioError, match=f"content changed since ingest: sha256 {now} != {sha}"):
        load_ingested(recorded)
