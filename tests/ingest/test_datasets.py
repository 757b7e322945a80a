"""Datasets at ingest: default names, tasks from a manifest's kind, a clip in several datasets, splits kept
for life, the stock ASR manifest format, and the migration of a database from before datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets
from qwen_tasks.ingest.register import ingest
from qwen_tasks.store import schema


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)


def clip(path: Path, seed: int, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype("float32")
    sf.write(path, data, 16000)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def members(engine: Engine) -> dict[str, set[str]]:
    """dataset name -> the sha256 of its member clips."""
    d, da, a = schema.dataset, schema.dataset_audio, schema.audio
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(d.c.name, a.c.sha256)
            .join(da, da.c.dataset_id == d.c.id)
            .join(a, a.c.id == da.c.audio_id)
        ).all()
    out: dict[str, set[str]] = {}
    for name, sha in rows:
        out.setdefault(name, set()).add(sha)
    return out


def stored(engine: Engine) -> dict[str, tuple[str, list[str]]]:
    with engine.connect() as conn:
        return {r.name: (r.split, list(r.tasks)) for r in conn.execute(sa.select(schema.dataset))}


def test_default_names_and_tasks_from_each_source(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "Voice Notes"
    for i in range(3):
        clip(folder / f"n{i}.wav", i)
    clip(tmp_path / "cry" / "c0.wav", 10)
    clip(tmp_path / "cry" / "c1.wav", 11)
    cry = jsonl(
        tmp_path / "cry" / "nursery.jsonl",
        [
            {"question": "Is there a baby crying?", "audio": f"c{i}.wav", "gt": "yes" if i else "no"}
            for i in (0, 1)
        ],
    )
    asr = jsonl(tmp_path / "cry" / "digits.jsonl", [{"audio": "c0.wav", "text": "one two"}])
    summary = ingest(engine, [folder], manifests=[(cry, None), (asr, "asr")])
    assert stored(engine) == {
        "Voice-Notes": ("train", ["asr", "cry"]),
        "nursery": ("train", ["cry"]),
        "digits": ("train", ["asr"]),
    }
    assert {d["name"]: d["clips_added"] for d in summary.datasets} == {
        "Voice-Notes": 3,
        "nursery": 2,
        "digits": 1,
    }
    got = members(engine)
    # c0.wav is in both manifests: one audio row, a member of both datasets
    assert got["nursery"] & got["digits"] and len(got["digits"]) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.audio)).scalar_one() == 5
    # ingesting the same sources again adds nobody and keeps every membership
    again = ingest(engine, [folder], manifests=[(cry, None), (asr, "asr")])
    assert [d["clips_added"] for d in again.datasets] == [0, 0, 0]
    assert members(engine) == got


def test_one_dataset_for_everything_named_and_tasks_grow(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "a" / "x.wav", 1)
    clip(tmp_path / "b" / "y.wav", 2)
    m = jsonl(tmp_path / "b" / "m.jsonl", [{"audio": "y.wav", "text": "hello"}])
    ingest(engine, [tmp_path / "a"], dataset="calls", tasks=["cry"])
    assert stored(engine) == {"calls": ("train", ["cry"])}
    ingest(engine, [], manifests=[(m, None)], dataset="calls")
    assert stored(engine) == {"calls": ("train", ["asr", "cry"])}  # the manifest's task joins
    assert len(members(engine)["calls"]) == 2


def test_a_dataset_keeps_its_split_and_nothing_is_written_on_refusal(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "eval" / "e.wav", 1)
    ingest(engine, [tmp_path / "eval"], dataset="eval", split="test")
    clip(tmp_path / "more" / "f.wav", 2)
    with pytest.raises(ConfigError, match="'eval' is a test dataset; it cannot become train"):
        ingest(engine, [tmp_path / "more"], dataset="eval", split="train")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.audio_file)).scalar_one() == 1
    ingest(engine, [tmp_path / "more"], dataset="eval")  # no --split: the dataset's own
    assert stored(engine) == {"eval": ("test", ["asr", "cry"])}
    assert len(members(engine)["eval"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "no spaces"}, "is not a valid dataset name"),
        ({"split": "dev"}, "--split must be train or test"),
        ({"tasks": ["asr", "vad"]}, "--tasks must name tasks among"),
    ],
)
def test_bad_dataset_options_are_refused_before_anything_is_read(
    engine: Engine, tmp_path: Path, kwargs: dict, message: str
) -> None:
    clip(tmp_path / "x.wav", 1)
    with pytest.raises(ConfigError, match=message):
        ingest(engine, [tmp_path], **kwargs)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.audio_file)).scalar_one() == 0


def test_stock_asr_manifest_lines_with_gt_and_source(engine: Engine, tmp_path: Path) -> None:
    """The original Qwen-Audio's eval manifests ({"audio", "gt", "source"}, what its evaluate_asr.py
    reads) ingest as ASR references, with the source stored for both kinds."""
    for i in range(3):
        clip(tmp_path / f"{i}.wav", i)
    m = jsonl(
        tmp_path / "librispeech_test_clean.jsonl",
        [
            {"audio": "0.wav", "gt": "he hoped there would be stew", "source": "librispeech_test_clean"},
            {"audio": "1.wav", "gt": "甚至出现交易几乎停滞的情况", "source": "aishell1_test"},
            {"audio": "2.wav", "question": "Is there a baby crying?", "gt": "no", "source": "nursery"},
        ],
    )
    for kind in (None, "asr"):
        summary = ingest(engine, [], manifests=[(m, kind)])
        assert summary.manifest_items == (3 if kind is None else 2)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.manifest_item.c.kind, schema.manifest_item.c.reference_text,
                      schema.manifest_item.c.gold_label, schema.manifest_item.c.source)
            .order_by(schema.manifest_item.c.line_no)
        ).all()  # fmt: skip
        refs = dict(
            conn.execute(
                sa.select(schema.asr_reference.c.reference_text, schema.asr_reference.c.source)
            ).all()
        )
    assert [tuple(r) for r in rows] == [
        ("asr", "he hoped there would be stew", None, "librispeech_test_clean"),
        ("asr", "甚至出现交易几乎停滞的情况", None, "aishell1_test"),
    ]  # the aqa line was dropped by the --kind asr re-ingest (its line is not valid asr)
    assert set(refs) == {"he hoped there would be stew", "甚至出现交易几乎停滞的情况"}
    assert stored(engine) == {"librispeech_test_clean": ("train", ["asr", "cry"])}  # both kinds seen


def test_a_yes_no_gt_without_question_is_still_cry_gold(engine: Engine, tmp_path: Path) -> None:
    clip(tmp_path / "0.wav", 0)
    m = jsonl(tmp_path / "gold.jsonl", [{"audio": "0.wav", "gt": "yes", "source": "c"}])
    ingest(engine, [], manifests=[(m, None)])
    with engine.connect() as conn:
        assert conn.execute(sa.select(schema.cry_gold.c.gold_label)).scalars().all() == ["yes"]
    assert stored(engine) == {"gold": ("train", ["cry"])}


def test_cli_datasets_lists_them(engine: Engine, database_url: str, tmp_path: Path) -> None:
    for i in range(2):
        clip(tmp_path / "t" / f"{i}.wav", i)
    m = jsonl(
        tmp_path / "t" / "m.jsonl",
        [{"question": "q?", "audio": f"{i}.wav", "gt": "yes" if i else "no"} for i in range(2)],
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["ingest", "--manifest", str(m), "--dataset", "t-eval", "--split", "test", "--json"]
    )
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["datasets", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [
        (r["name"], r["split"], r["tasks"], r["clips"], r["cry_gold_yes"], r["cry_gold_no"]) for r in rows
    ] == [("t-eval", "test", ["cry"], 2, 1, 1)]
    bad = runner.invoke(app, ["ingest", str(tmp_path / "t"), "--dataset", "t-eval", "--split", "train"])
    assert bad.exit_code == 1
    assert "is a test dataset" in bad.output and "Traceback" not in bad.output


def test_migration_turns_earlier_audio_into_datasets_and_keeps_labels(tmp_path: Path, admin_url: str) -> None:
    """A database migrated to 0006 with audio, manifests and labels, then upgraded: a dataset per
    manifest (its kinds' tasks) and per folder of the audio no manifest names; labels untouched."""
    from yoyo import get_backend, read_migrations

    from qwen_tasks.store import database as db

    with db.scratch_database(admin_url, prefix="qwen_tasks_migrate") as url:
        engine = db.get_engine(url)
        with engine.begin() as conn:  # back to an empty database, then migrations up to 0006
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        backend = get_backend(db._yoyo_uri(engine.url))
        every = read_migrations(str(db.MIGRATIONS_DIR))
        old = every.filter(lambda m: m.id < "0007")
        with backend.lock():
            backend.apply_migrations(backend.to_apply(old))
        backend.connection.close()
        with engine.begin() as conn:
            ids = [
                conn.execute(
                    sa.text(
                        "INSERT INTO audio (sha256, size_bytes, duration_s, sample_rate, channels, frames, "
                        "format) VALUES (:s, 10, 1.0, 16000, 1, 16000, 'WAV') RETURNING id"
                    ),
                    {"s": f"{i:064x}"},
                ).scalar_one()
                for i in range(4)
            ]
            paths = ["/data/m/a.wav", "/data/m/b.wav", "/data/notes/c.wav", "/data/notes/d.wav"]
            for audio_id, path in zip(ids, paths, strict=True):
                conn.execute(
                    sa.text(
                        "INSERT INTO audio_file (path, audio_id, status, root) VALUES (:p, :a, 'ok', :r)"
                    ),
                    {"p": path, "a": audio_id, "r": "/data/notes" if "notes" in path else "/data/m"},
                )
            conn.execute(
                sa.text(
                    "INSERT INTO manifest_item (manifest_path, line_no, kind, audio_path, audio_file_id, "
                    "question, gt, gold_label) SELECT '/data/m/cry set.jsonl', row_number() OVER (), 'aqa', "
                    "path, id, 'q?', 'yes', 'yes' FROM audio_file WHERE path LIKE '/data/m/%'"
                )
            )
            run = conn.execute(
                sa.text(
                    "INSERT INTO label_run (task, model, prompt_version) "
                    "VALUES ('cry', 'm', 'p') RETURNING id"
                )
            ).scalar_one()
            job = conn.execute(
                sa.text("INSERT INTO label_job (run_id, seq, n_items) VALUES (:r, 0, 4) RETURNING id"),
                {"r": run},
            ).scalar_one()
            for audio_id in ids:
                conn.execute(
                    sa.text("INSERT INTO label_job_item VALUES (:j, :r, :a)"),
                    {"j": job, "r": run, "a": audio_id},
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO cry_answer (run_id, job_id, audio_id, method, p_yes, label) "
                        "VALUES (:r, :j, :a, 'score', 0.7, 'yes')"
                    ),
                    {"r": run, "j": job, "a": audio_id},
                )
        assert "0007_datasets" in db.upgrade(engine)
        assert stored(engine) == {"cry-set": ("train", ["cry"]), "notes": ("train", ["asr", "cry"])}
        with engine.connect() as conn:
            by_name = dict(
                conn.execute(
                    sa.select(schema.dataset.c.name, sa.func.count())
                    .join(schema.dataset_audio, schema.dataset_audio.c.dataset_id == schema.dataset.c.id)
                    .group_by(schema.dataset.c.name)
                ).all()
            )
            assert by_name == {"cry-set": 2, "notes": 2}
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.cry_answer)).scalar_one() == 4
            covered = conn.execute(
                sa.select(schema.run_dataset.c.n_items).order_by(schema.run_dataset.c.n_items)
            )
            assert covered.scalars().all() == [2, 2]
            labels = conn.execute(
                sa.select(schema.latest_label.c.label).where(schema.latest_label.c.task == "cry")
            )
            assert labels.scalars().all() == ["yes"] * 4
        assert [d.name for d in datasets.resolve(engine, [], task="asr")] == ["notes"]
        engine.dispose()
