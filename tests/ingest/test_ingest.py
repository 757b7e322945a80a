"""Ingest end to end: real files in a temp folder (numpy + soundfile), the real database, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.manifests import parse_gold_label
from qwen_tasks.ingest.register import IngestSummary, ingest
from qwen_tasks.store import schema

QT = Path(sys.executable).with_name("qwen-tasks")
ODD_NAMES = [
    'it\'s "quoted"; DROP TABLE audio;--.wav',
    "婴儿 哭声 %_ 100%.flac",
    "spaces  and\ttab.ogg",
]


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)


def clip(path: Path, seed: int, seconds: float = 0.5, rate: int = 16000, **kwargs: object) -> Path:
    """A short, unique (by seed) noise clip."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate, **kwargs)
    return path


def make_tree(root: Path) -> dict[str, str]:
    """Good files (mixed formats, odd names, a long one, a duplicate) and one of every bad kind.
    Returns {relative path: expected quarantine reason prefix} for the bad ones."""
    clip(root / "a.wav", 1)
    clip(root / "sub" / "b.flac", 2, rate=8000)
    clip(root / "sub" / "deeper" / "c.ogg", 3, rate=22050)
    clip(root / "UPPER.WAV", 4, rate=48000)
    sf.write(root / "stereo.wav", np.zeros((4000, 2), dtype=np.int16) + 7, 16000)
    sf.write(root / "long.wav", np.ones(8000 * 150, dtype=np.int16), 8000)  # 2.5 minutes
    for i, name in enumerate(ODD_NAMES):
        clip(root / name, 10 + i)
    shutil.copyfile(root / "a.wav", root / "sub" / "copy of a.wav")
    (root / "notes.txt").write_text("not audio, not an audio name: ignored")

    bad = {
        "empty.wav": "empty file (0 bytes)",
        "text.mp3": "not an audio file",
        "zero.wav": "zero frames",
        "nan.wav": "contains NaN/Inf samples",
        "cut.wav": "truncated: header declares",
        "cut.flac": "truncated",
        "folder.wav": "is a directory",
        "dangling.wav": "dangling symlink",
        "loop.wav": "symlink loop",
        "escape.wav": "outside allowed roots",
    }
    (root / "empty.wav").write_bytes(b"")
    (root / "text.mp3").write_text("hello\n" * 50)
    sf.write(root / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = np.full(1600, 0.1, dtype=np.float32)
    nan[7] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    for name in ("cut.wav", "cut.flac"):
        data = clip(root / name, 20, seconds=2.0).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    (root / "folder.wav").mkdir()
    clip(root / "folder.wav" / "inside.wav", 21)  # a real file inside a directory named like audio
    (root / "dangling.wav").symlink_to(root / "gone.wav")
    (root / "loop.wav").symlink_to(root / "loop.wav")
    outside = root.parent / "outside"  # not under root: the default allowed root is root itself
    clip(outside / "secret.wav", 22)
    (root / "escape.wav").symlink_to(outside / "secret.wav")
    (root / "sub" / "up").symlink_to(root)  # a directory symlink back up: must not loop forever
    return bad


def rows(engine: Engine, table: sa.Table) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table)))


def by_path(engine: Engine) -> dict[str, sa.Row]:
    return {r.path: r for r in rows(engine, schema.audio_file)}


def test_folder_ingest_registers_good_files_and_quarantines_each_bad_kind(
    engine: Engine, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    bad = make_tree(root)

    summary = ingest(engine, [root])

    # 10 distinct good files: a, b, c, UPPER, stereo, long, 3 odd names, folder.wav/inside.wav
    assert (summary.new, summary.duplicate, summary.unchanged, summary.changed) == (10, 1, 0, 0)
    assert summary.quarantined == len(bad)
    reasons = {Path(q["path"]).name: q["reason"] for q in summary.quarantine}
    for name, expected in bad.items():
        assert reasons[name].startswith(expected), (name, reasons[name])

    files = by_path(engine)
    audio = {r.id: r for r in rows(engine, schema.audio)}
    assert len(audio) == 10
    for name in ODD_NAMES:  # stored verbatim
        assert files[str(root / name)].status == "ok"
    assert files[str(root / "a.wav")].audio_id == files[str(root / "sub" / "copy of a.wav")].audio_id
    long_row = audio[files[str(root / "long.wav")].audio_id]
    assert (long_row.duration_s, long_row.sample_rate, long_row.frames) == (150.0, 8000, 1_200_000)
    stereo = audio[files[str(root / "stereo.wav")].audio_id]
    assert (stereo.channels, stereo.format, stereo.subtype) == (2, "WAV", "PCM_16")
    for name, expected in bad.items():
        row = files[str(root / name)]
        assert row.status == "quarantined" and row.audio_id is None and row.reason.startswith(expected)
    assert files[str(root / "escape.wav")].size_bytes is None  # judged from its real path, never read
    assert not any("secret" in p or "/up/" in p for p in files)  # loop link not followed twice
    assert str(root / "notes.txt") not in files


def test_same_bytes_under_two_paths_are_one_audio_with_two_files(engine: Engine, tmp_path: Path) -> None:
    """Dedup through the public path: ingest two paths with the same bytes (and, on a later run, a third
    copy), then count. A broken sha256 lookup or a missing unique key would give two audio rows."""
    original = clip(tmp_path / "a" / "baby.wav", seed=7)
    copy = tmp_path / "b" / "copy of baby.wav"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    clip(tmp_path / "a" / "other.wav", seed=8)

    first = ingest(engine, [tmp_path])
    assert (first.new, first.duplicate, first.quarantined) == (2, 1, 0), first.to_dict()
    shutil.copyfile(original, tmp_path / "c.wav")
    second = ingest(engine, [tmp_path])
    assert (second.new, second.duplicate, second.unchanged) == (0, 1, 3), second.to_dict()

    with engine.connect() as conn:
        files = conn.execute(
            sa.select(schema.audio_file.c.path, schema.audio_file.c.audio_id).where(
                schema.audio_file.c.status == "ok"
            )
        ).all()
        audio_rows = conn.execute(sa.select(sa.func.count()).select_from(schema.audio)).scalar_one()
    by_name = {Path(os.fsdecode(r.path)).name: r.audio_id for r in files}
    assert audio_rows == 2
    assert by_name["baby.wav"] == by_name["copy of baby.wav"] == by_name["c.wav"]
    assert by_name["other.wav"] != by_name["baby.wav"]


def test_rerun_is_idempotent_and_a_changed_file_is_reprobed(engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "data"
    bad = make_tree(root)
    ingest(engine, [root])
    before_audio = len(rows(engine, schema.audio))
    before_files = {p: (r.id, r.audio_id, r.status) for p, r in by_path(engine).items()}

    again = ingest(engine, [root])

    assert (again.new, again.duplicate, again.unchanged, again.changed) == (0, 0, 11, 0)
    assert again.quarantined == len(bad)  # bad files are looked at again (they may have been fixed)
    assert len(rows(engine, schema.audio)) == before_audio
    assert {p: (r.id, r.audio_id, r.status) for p, r in by_path(engine).items()} == before_files

    target = root / "sub" / "b.flac"
    old_audio = before_files[str(target)][1]
    clip(target, 99, rate=8000)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a clear mtime change
    (root / "empty.wav").write_bytes((root / "a.wav").read_bytes())  # a bad file fixed: same as a.wav

    third = ingest(engine, [root])

    assert (third.new, third.changed, third.duplicate, third.unchanged) == (0, 1, 1, 10)
    assert third.quarantined == len(bad) - 1
    files = by_path(engine)
    assert files[str(target)].audio_id not in (None, old_audio)
    assert files[str(root / "empty.wav")].audio_id == files[str(root / "a.wav")].audio_id
    assert len(rows(engine, schema.audio)) == before_audio + 1  # old content kept for its labels


def test_deleted_file_is_marked_missing(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "keep.wav", 1)
    clip(tmp_path / "gone.wav", 2)
    ingest(engine, [tmp_path])
    (tmp_path / "gone.wav").unlink()

    summary = ingest(engine, [tmp_path])

    assert (summary.unchanged, summary.missing) == (1, 1)
    gone = by_path(engine)[str(tmp_path / "gone.wav")]
    assert (gone.status, gone.audio_id, gone.reason) == ("missing", None, "file no longer exists")


def write_jsonl(path: Path, lines: list[object]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
            f.write("\n")
    return path


def test_both_manifest_formats_with_relative_paths_and_malformed_lines(
    engine: Engine, tmp_path: Path
) -> None:
    data = tmp_path / "set"
    clip(data / "audio" / "1.wav", 1)
    clip(data / "audio" / "2.wav", 2)
    clip(data / "audio" / "3.flac", 3)
    asr = write_jsonl(
        data / "asr.jsonl",
        [
            {"audio": "audio/1.wav", "text": "the quick brown fox"},
            {"audio": str(data / "audio" / "2.wav"), "text": "今天天气很好", "language": "zh"},
            "{not json",
            {"text": "no audio key"},
            "",
            {"audio": "audio/missing.wav", "text": "file does not exist"},
        ],
    )
    aqa = write_jsonl(
        data / "cry.jsonl",
        [
            {"question": "Is a baby crying?", "audio": "audio/1.wav", "gt": "Yes", "source": "s1"},
            {"question": "Is a baby crying?", "audio": "./audio/2.wav", "gt": "不哭", "source": "s2"},
            {"question": "Describe the sound.", "audio": "audio/3.flac", "gt": "a dog barks"},
            ["a", "list"],
        ],
    )

    summary = ingest(engine, [asr], manifests=[(aqa, None)])

    assert (summary.new, summary.duplicate, summary.quarantined) == (3, 0, 1)
    assert summary.quarantine == [{"path": str(data / "audio" / "missing.wav"), "reason": "no such file"}]
    assert summary.manifest_items == 6
    errors = {(Path(e["manifest"]).name, e["line"]): e["reason"] for e in summary.manifest_errors}
    assert errors.keys() == {("asr.jsonl", 3), ("asr.jsonl", 4), ("cry.jsonl", 4)}
    assert errors[("asr.jsonl", 3)].startswith("bad JSON")
    assert "audio" in errors[("asr.jsonl", 4)]

    items = {(Path(r.manifest_path).name, r.line_no): r for r in rows(engine, schema.manifest_item)}
    assert set(items) == {("asr.jsonl", n) for n in (1, 2, 6)} | {("cry.jsonl", n) for n in (1, 2, 3)}
    files = {r.id: r for r in rows(engine, schema.audio_file)}
    first = items[("asr.jsonl", 1)]
    assert (first.kind, first.reference_text, first.audio_path) == (
        "asr",
        "the quick brown fox",
        str(data / "audio" / "1.wav"),
    )
    assert files[first.audio_file_id].status == "ok"
    assert items[("asr.jsonl", 2)].language == "zh"
    assert files[items[("asr.jsonl", 6)].audio_file_id].status == "quarantined"
    cry = [items[("cry.jsonl", n)] for n in (1, 2, 3)]
    assert [(r.kind, r.gt, r.gold_label, r.source) for r in cry] == [
        ("aqa", "Yes", "yes", "s1"),
        ("aqa", "不哭", "no", "s2"),
        ("aqa", "a dog barks", None, None),
    ]
    assert cry[1].raw["audio"] == "./audio/2.wav"  # the line is kept verbatim
    assert cry[0].audio_file_id == first.audio_file_id  # one path, one audio_file row


def test_manifest_rerun_rewrites_nothing_and_drops_removed_lines(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "1.wav", 1)
    clip(tmp_path / "2.wav", 2)
    lines = [{"audio": "1.wav", "text": "one"}, {"audio": "2.wav", "text": "two"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", lines)
    ingest(engine, [manifest])
    stamps = {r.line_no: r.ingested_at for r in rows(engine, schema.manifest_item)}

    again = ingest(engine, [manifest])
    assert (again.new, again.unchanged, again.manifest_items) == (0, 2, 2)
    assert {r.line_no: r.ingested_at for r in rows(engine, schema.manifest_item)} == stamps

    write_jsonl(manifest, [{"audio": "2.wav", "text": "two, corrected"}])
    ingest(engine, [manifest])
    (only,) = rows(engine, schema.manifest_item)
    assert (only.line_no, only.reference_text) == (1, "two, corrected")


def test_one_unstorable_line_is_reported_and_every_other_line_ingested(
    engine: Engine, tmp_path: Path
) -> None:
    data = tmp_path / "set"
    clip(data / "a.wav", 1)
    good = json.dumps({"question": "Is a baby crying?", "audio": "a.wav", "gt": "yes", "source": "s"})
    lines = [good] * 1000
    lines[599] = good.replace('"yes"', '"ye\\u0000s"')  # line 600: a NUL escape in gt
    manifest = write_jsonl(data / "cry.jsonl", lines)

    summary = ingest(engine, [manifest])

    assert summary.manifest_items == 999
    assert summary.manifest_errors == [
        {"manifest": str(manifest), "line": 600, "reason": 'contains a NUL character (\\u0000) in "gt"'}
    ]
    assert _count(engine, schema.manifest_item) == 999


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"audio": "a\\u0000.wav", "text": "x"}', 'contains a NUL character (\\u0000) in "audio"'),
        ('{"audio": "a.wav", "text": "\\u0000"}', 'contains a NUL character (\\u0000) in "text"'),
        ('{"audio": "a.wav", "text": "x\\ud800"}', 'contains a lone surrogate escape (\\ud800) in "text"'),
        ('{"audio": "\\udcff.wav", "text": "x"}', 'contains a lone surrogate escape (\\udcff) in "audio"'),
        ('{"audio": "a.wav", "gt": "no", "meta": {"k": ["\\ud800"]}}', "contains a lone surrogate escape"),
        ('{"audio": "a.wav", "gt": "no", "\\u0000": 1}', "contains a NUL character (\\u0000) in a key"),
        ('{"audio": "a.wav", "gt": NaN}', "bad JSON: NaN is not valid JSON"),
        ('{"audio": "a.wav", "gt": 1e999}', "bad JSON: number 1e999 is out of range"),
    ],
)
def test_lines_postgres_cannot_store_are_malformed_lines(
    engine: Engine, tmp_path: Path, line: str, reason: str
) -> None:
    clip(tmp_path / "a.wav", 1)
    ok = json.dumps({"audio": "a.wav", "text": "fine", "gt": "yes"})
    manifest = write_jsonl(tmp_path / "m.jsonl", [ok, line, '{"audio": "a.wav", "text": "\\ud83d\\ude00"}'])

    summary = ingest(engine, [manifest])

    assert [(e["line"], e["reason"][: len(reason)]) for e in summary.manifest_errors] == [(2, reason)]
    assert summary.manifest_items == 2  # a proper surrogate pair (an emoji) is fine
    texts = {r.line_no: r.reference_text for r in rows(engine, schema.manifest_item)}
    assert texts == {1: "fine", 3: "\U0001f600"}


def test_conflicting_answers_for_one_audio_are_warned_and_counted(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "a.wav", 1)
    clip(tmp_path / "b.wav", 2)
    q = "Is a baby crying?"
    cry = write_jsonl(
        tmp_path / "cry.jsonl",
        [
            {"question": q, "audio": "a.wav", "gt": "yes"},
            {"question": q, "audio": "./a.wav", "gt": "Yes, a baby is crying."},  # same answer, other words
            {"question": "Is a dog barking?", "audio": "a.wav", "gt": "no"},  # another question
            {"question": q, "audio": "b.wav", "gt": "no"},
            {"question": q, "audio": "a.wav", "gt": "不哭"},  # contradicts line 1
        ],
    )
    asr = write_jsonl(
        tmp_path / "asr.jsonl",
        [{"audio": "b.wav", "text": "hello  world"}, {"audio": "b.wav", "text": "hello world"}],
    )
    other = write_jsonl(tmp_path / "more.jsonl", [{"audio": "b.wav", "text": "goodbye world"}])

    summary = ingest(engine, [cry, asr, other])

    assert summary.manifest_conflicts == 2
    warnings = {
        (Path(str(w["manifest"])).name, w["line"]): str(w["reason"]) for w in summary.manifest_warnings
    }
    assert set(warnings) == {("cry.jsonl", 5), ("more.jsonl", 1)}
    assert warnings[("cry.jsonl", 5)].startswith(
        f"conflicting gt for {tmp_path / 'a.wav'}: '不哭' here, 'yes' at line 1"
    )
    assert f"'hello  world' at {asr}:1" in warnings[("more.jsonl", 1)]
    assert summary.manifest_items == 8  # every line is still stored
    done = CliRunner().invoke(app, ["ingest", str(cry)])
    assert done.exit_code == 0
    assert f"warning {cry}:5: conflicting gt" in done.stderr
    assert "manifest conflicts 1" in done.stderr


@pytest.mark.parametrize("folder", ["/m/data", "/", "/m/with space/"])
def test_audio_paths_resolve_exactly_like_abspath(folder: str) -> None:
    """The per-folder cache behind manifest paths gives what os.path.abspath(join(...)) gives."""
    from qwen_tasks.ingest.manifests import _resolve

    cases = [
        "a.wav",
        "sub/a.wav",
        "./a.wav",
        "../x/a.wav",
        "/abs/a.wav",
        "a//b.wav",
        "sub/../a.wav",
        "~/a.wav",
    ]
    cases += [
        "~",
        "~x",
        "a/",
        "a/.",
        "a/..",
        "..",
        ".",
        "./",
        "//x/y.wav",
        "///a.wav",
        "x/./y.wav",
        "婴儿/哭.wav",
    ]
    for audio in cases:
        expected = os.path.abspath(os.path.join(folder, os.path.expanduser(audio)))
        assert _resolve(os.path.join(folder, "m.jsonl"), audio) == expected, audio


def test_kind_option_rejects_lines_of_the_other_format(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "1.wav", 1)
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [{"audio": "1.wav", "text": "asr line"}, {"audio": "1.wav", "question": "q?", "gt": "no"}],
    )
    summary = ingest(engine, [], manifests=[(manifest, "asr")])
    assert summary.manifest_items == 1
    assert [(e["line"], e["reason"]) for e in summary.manifest_errors] == [
        (2, 'not an asr line: no reference transcript ("text", or "gt" without a "question")')
    ]


def test_traversal_and_paths_outside_roots_are_quarantined_unread(engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    clip(data / "ok.wav", 1)
    elsewhere = clip(tmp_path / "elsewhere" / "x.wav", 2)
    manifest = write_jsonl(
        data / "m.jsonl",
        [
            {"audio": "../../../../../../etc/passwd", "text": "traversal"},
            {"audio": "/etc/passwd", "text": "absolute"},
            {"audio": str(elsewhere), "text": "absolute, another folder"},
            {"audio": "ok.wav", "text": "fine"},
        ],
    )

    summary = ingest(engine, [manifest])

    assert summary.new == 1
    outside = {q["path"]: q["reason"] for q in summary.quarantine}
    assert outside == {
        "/etc/passwd": "outside allowed roots",
        str(elsewhere): "outside allowed roots",
    }
    files = by_path(engine)
    assert files["/etc/passwd"].size_bytes is None and files["/etc/passwd"].status == "quarantined"

    allowed = ingest(engine, [manifest], roots=[tmp_path])  # an explicit root that includes elsewhere/
    assert allowed.new == 1 and allowed.quarantined == 1


def test_allowed_roots_from_environment(engine: Engine, tmp_path: Path, monkeypatch) -> None:
    clip(tmp_path / "a" / "1.wav", 1)
    clip(tmp_path / "b" / "2.wav", 2)
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", str(tmp_path / "a"))
    summary = ingest(engine, [tmp_path / "a", tmp_path / "b" / "2.wav"])
    assert summary.new == 1
    assert summary.quarantine == [{"path": str(tmp_path / "b" / "2.wav"), "reason": "outside allowed roots"}]


def test_non_utf8_file_name_is_stored_losslessly_and_stays_stable(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "fine.wav", 1)
    raw = os.fsencode(tmp_path) + b"/bad\xff name.wav"
    with open(raw, "wb") as f:
        f.write(clip(tmp_path.parent / f"{tmp_path.name}-src.wav", 2).read_bytes())
    shown = f"{tmp_path}/bad\\xff name.wav"

    first = ingest(engine, [tmp_path])
    assert (first.new, first.quarantined, first.quarantine) == (2, 0, [])
    for _ in range(3):  # it used to alternate between quarantined and missing on every re-run
        again = ingest(engine, [tmp_path])
        assert (again.unchanged, again.quarantined, again.missing) == (2, 0, 0), again
        row = by_path(engine)[shown]
        assert (row.status, bytes(row.path_bytes)) == ("ok", raw)
    assert by_path(engine)[str(tmp_path / "fine.wav")].path_bytes is None  # UTF-8 names: path is exact

    os.unlink(raw)
    gone = ingest(engine, [tmp_path])
    assert (gone.unchanged, gone.missing) == (1, 1)
    assert by_path(engine)[shown].status == "missing"


def test_missing_path_is_a_config_error_and_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "1.wav", 1)
    with pytest.raises(ConfigError, match="no such file or directory"):
        ingest(engine, [tmp_path, tmp_path / "nope"])
    assert rows(engine, schema.audio_file) == []


@pytest.mark.parametrize(
    ("gt", "label"),
    [
        ("yes", "yes"),
        ("No.", "no"),
        (" TRUE ", "yes"),
        ("false", "no"),
        ("1", "yes"),
        (0, "no"),
        (True, "yes"),
        ("哭", "yes"),
        ("不哭", "no"),
        ("有", "yes"),
        ("没有", "no"),
        ("是", "yes"),
        ("否", "no"),
        ("是的，宝宝在哭。", "yes"),
        ("Yes, a baby is crying.", "yes"),
        ("No, it is a cat.", "no"),
        ("not crying", "no"),
        ("a dog barks", None),
        ("maybe", None),
        ("nobody knows", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_gold_label(gt: object, label: str | None) -> None:
    assert parse_gold_label(gt) == label


def _ingest_as_nobody(url: str, folder: Path) -> dict[str, object]:
    """Run ingest in a forked child that dropped root, so file permissions apply (tests run as root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        payload: object
        try:
            os.setgid(65534)
            os.setuid(65534)
            child_engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            payload = ingest(child_engine, [folder]).to_dict()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            payload = {"error": repr(exc)}
        finally:
            os.write(write_end, json.dumps(payload).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return result


def test_unreadable_file_is_quarantined_and_neighbours_ingested(engine: Engine, database_url: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="qt-perm-"))  # in /tmp: traversable by an unprivileged user
    try:
        folder.chmod(0o755)
        for i in range(3):
            clip(folder / f"{i}.wav", i).chmod(0o644)
        clip(folder / "secret.wav", 9).chmod(0o000)
        summary = (
            _ingest_as_nobody(database_url, folder)
            if os.geteuid() == 0
            else ingest(engine, [folder]).to_dict()
        )
        assert summary.get("error") is None, summary
        assert (summary["new"], summary["quarantined"]) == (3, 1)
        assert summary["quarantine"] == [{"path": str(folder / "secret.wav"), "reason": "permission denied"}]
    finally:
        shutil.rmtree(folder)


def test_cli_json_summary_and_errors(engine: Engine, tmp_path: Path) -> None:
    make_tree(tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(tmp_path / "data"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(IngestSummary().to_dict()) == set(summary)
    assert (summary["new"], summary["duplicate"], summary["quarantined"]) == (10, 1, 10)
    assert all(set(q) == {"path", "reason"} for q in summary["quarantine"])

    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--json"])
    assert missing.exit_code == 1
    assert json.loads(missing.stdout) == {"error": f"no such file or directory: {tmp_path / 'nope'}"}
    assert "no such file or directory" in missing.stderr


def test_cli_database_down_is_one_line_and_nonzero(tmp_path: Path) -> None:
    clip(tmp_path / "1.wav", 1)
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [str(QT), "ingest", str(tmp_path), "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect"), done.stderr
    assert json.loads(done.stdout) == {"error": lines[0].removeprefix("error: ")}  # --json: one object


def _count(engine: Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


@pytest.mark.slow
def test_kill_mid_ingest_then_rerun_completes_without_duplicates(engine: Engine, tmp_path: Path) -> None:
    n = 2000
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    header_source = clip(tmp_path / "template.wav", 0, seconds=0.05)
    header = header_source.read_bytes()[:44]
    for i in range(n):  # 2000 distinct 50 ms clips, written directly (fast)
        samples = rng.integers(-3000, 3000, 800, dtype=np.int16).tobytes()
        (folder / f"{i:04d}.wav").write_bytes(header + samples)

    proc = subprocess.Popen(
        [str(QT), "ingest", str(folder), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    committed = 0
    deadline = time.monotonic() + 120
    while committed == 0 and proc.poll() is None and time.monotonic() < deadline:
        committed = _count(engine, schema.audio_file)
        time.sleep(0.005)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if not still_running:
        pytest.fail(f"ingest finished before it could be killed: {proc.stderr.read().decode()[-500:]}")

    at_kill = _count(engine, schema.audio_file)
    assert 0 < at_kill < n
    assert at_kill % 500 == 0  # whole chunks only: a chunk commits with all its rows or not at all
    assert _count(engine, schema.audio) == at_kill

    rerun = subprocess.run([str(QT), "ingest", str(folder), "--json"], capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    summary = json.loads(rerun.stdout)
    assert summary["unchanged"] == at_kill
    assert summary["new"] == n - at_kill
    assert summary["quarantined"] == 0
    with engine.connect() as conn:
        paths = conn.execute(sa.select(schema.audio_file.c.path)).scalars().all()
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())
    assert _count(engine, schema.audio) == n
