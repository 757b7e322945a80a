"""Audio in object storage, against a real S3 server (moto's server mode, tests/s3_server.py).

Ingest of a bucket prefix and of a bucket manifest; re-ingest of unchanged objects downloads nothing
(counted in the server's own request log); an overwritten object is re-checked and relabelled, a
deleted one becomes `missing`; allowed roots hold URL prefixes with segment boundaries; URLs with
credentials are refused without printing them; labelling reads objects through the bounded cache and
checks the bytes against the sha256 ingest recorded; two `qwen-tasks work` processes whose working
directory and HOME differ, with the audio only in the bucket, label every clip once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import CLI, run_cli, write_clips
from s3_server import S3Server
from sqlalchemy.engine import Engine

from qwen_tasks.config import get_settings, split_paths
from qwen_tasks.errors import AudioError, ConfigError
from qwen_tasks.ingest import sources
from qwen_tasks.ingest.audio_files import load_ingested
from qwen_tasks.ingest.register import ingest
from qwen_tasks.records import RecordedPath
from qwen_tasks.store import schema


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)
    monkeypatch.setenv("QWEN_TASKS_OBJECT_CACHE_DIR", str(tmp_path / "object-cache"))


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def upload(local: Path, url: str) -> None:
    sources.filesystem(url).put_file(str(local), url)


def upload_clips(tmp_path: Path, prefix: str, n: int, seed: int = 0) -> list[str]:
    """n distinct wav clips uploaded under `prefix`; the local copies are deleted."""
    folder = tmp_path / f"local-{seed}"
    urls = []
    for path in write_clips(folder, [1.0 + 0.1 * i for i in range(n)], seed=seed):
        url = f"{prefix}/{path.name}"
        upload(path, url)
        urls.append(url)
    shutil.rmtree(folder)
    return urls


def files(engine: Engine) -> dict[str, sa.Row]:
    t = schema.audio_file
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.path, t.c.status, t.c.etag, t.c.root, t.c.audio_id, t.c.reason)
        ).all()
    return {r.path: r for r in rows}


def test_bucket_prefix_incremental_changed_and_missing(
    engine: Engine, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/recordings"
    urls = upload_clips(tmp_path, prefix, 4)
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio")
    upload(notes, f"{prefix}/notes.txt")

    first = ingest(engine, [prefix])
    assert (first.new, first.quarantined, first.skipped) == (4, 0, {".txt": 1})
    rows = files(engine)
    assert sorted(rows) == sorted(urls)
    assert all(r.status == "ok" and r.etag and r.root == prefix for r in rows.values())
    assert first.datasets[0]["name"] == "recordings"
    downloads = s3_server.object_gets(s3_bucket)
    assert downloads == 4  # each object streamed once: hashed and probed from that one download

    again = ingest(engine, [prefix])
    assert (again.new, again.unchanged, again.changed) == (0, 4, 0)
    assert s3_server.object_gets(s3_bucket) == downloads  # unchanged: listed, not downloaded

    other = write_clips(tmp_path / "other", [1.5], seed=7)[0]
    upload(other, urls[1])  # overwritten: new ETag and bytes
    sources.filesystem(prefix).rm(urls[2])  # deleted
    third = ingest(engine, [prefix])
    assert (third.changed, third.unchanged, third.missing) == (1, 2, 1)
    assert s3_server.object_gets(s3_bucket) == downloads + 1  # only the overwritten object
    rows = files(engine)
    assert rows[urls[2]].status == "missing" and rows[urls[2]].audio_id is None
    assert rows[urls[1]].audio_id != files(engine)[urls[0]].audio_id


def test_bucket_manifest_relative_lines_url_lines_and_bad_lines(
    engine: Engine, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    base = f"s3://{s3_bucket}/sets"
    clips = upload_clips(tmp_path, f"{base}/clips", 2)
    elsewhere = upload_clips(tmp_path, f"s3://{s3_bucket}/elsewhere", 1, seed=3)[0]
    lines = [
        {"audio": "clips/clip_000.wav", "question": "Is a baby crying?", "gt": "yes"},
        {"audio": clips[1], "question": "Is a baby crying?", "gt": "no"},
        {"audio": elsewhere, "question": "Is a baby crying?", "gt": "no"},
        {"audio": "../../../x.wav", "gt": "no"},
        {"audio": f"s3://key:top-secret@{s3_bucket}/x.wav", "gt": "no"},
    ]
    manifest = tmp_path / "cry.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    upload(manifest, f"{base}/cry.jsonl")

    summary = ingest(engine, [f"{base}/cry.jsonl"])  # a *.jsonl PATH in a bucket is a manifest
    shown = json.dumps(summary.to_dict())
    assert "top-secret" not in shown and "***@" in shown
    assert summary.manifest_items == 3 and len(summary.manifest_errors) == 2
    # default roots: the manifest's prefix; an object named outside it is refused, never downloaded
    assert summary.new == 2 and summary.quarantine == [{"path": elsewhere, "reason": "outside allowed roots"}]
    assert s3_server.object_gets(s3_bucket) == 3  # the manifest and the two clips
    with engine.connect() as conn:
        items = conn.execute(
            sa.select(schema.manifest_item.c.audio_path, schema.manifest_item.c.gold_label)
        ).all()
    assert sorted(items) == sorted([(clips[0], "yes"), (clips[1], "no"), (elsewhere, "no")])
    assert summary.datasets[0]["name"] == "cry"

    again = ingest(engine, [], manifests=[(f"{base}/cry.jsonl", "aqa")])
    assert (again.new, again.unchanged) == (0, 2)
    assert s3_server.object_gets(s3_bucket) == 4  # the manifest is read again; its clips are not


def test_allowed_url_roots_respect_segment_boundaries(
    engine: Engine, s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = upload_clips(tmp_path, f"s3://{s3_bucket}/pre", 1)[0]
    sibling = upload_clips(tmp_path, f"s3://{s3_bucket}/prefix2", 1, seed=5)[0]
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", f"{tmp_path}:s3://{s3_bucket}/pre/")
    assert get_settings().allowed_roots == (str(tmp_path.resolve()), f"s3://{s3_bucket}/pre")
    summary = ingest(engine, [inside, sibling, f"s3://{s3_bucket}/prefix2"])
    assert summary.new == 1
    assert sorted(q["path"] for q in summary.quarantine) == sorted([sibling, f"s3://{s3_bucket}/prefix2"])
    assert s3_server.object_gets(s3_bucket) == 1  # the sibling prefix was neither listed nor read

    # labelling checks again: a row admitted by a wider root is refused once the operator narrows them
    row = files(engine)[inside]
    recorded = RecordedPath(inside, None, None, f"s3://{s3_bucket}", None, "0" * 64)
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", f"s3://{s3_bucket}/other")
    with pytest.raises(AudioError, match="outside QWEN_TASKS_ALLOWED_ROOTS; not read"):
        load_ingested(recorded)
    assert row.root == f"s3://{s3_bucket}/pre"


def test_urls_with_credentials_or_dot_segments_are_refused_in_one_line(
    database_url: str, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"s3://\*\*\*@"):
        sources.check_url(f"s3://AKIA:secret-key@{s3_bucket}/a")
    with pytest.raises(ConfigError, match="'..' segment"):
        sources.check_url(f"s3://{s3_bucket}/a/../b")
    with pytest.raises(ConfigError, match="no filesystem for nosuchfs://"):
        sources.check_url("nosuchfs://bucket/a")
    done = run_cli(["ingest", f"s3://AKIA:secret-key@{s3_bucket}/a", "--json"], database_url)
    assert done.returncode == 1 and "secret-key" not in done.stdout + done.stderr
    assert "credentials in a URL are refused" in json.loads(done.stdout)["error"]
    assert done.stderr.count("\n") <= 1 and "Traceback" not in done.stderr
    missing = run_cli(["ingest", f"s3://{s3_bucket}/nothing-here"], database_url)
    assert missing.returncode == 1 and "no such file or directory: s3://" in missing.stderr
    down = run_cli(["ingest", f"s3://{s3_bucket}/a"], database_url, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    assert down.returncode == 1 and "object storage cannot be reached" in down.stderr
    assert "Traceback" not in down.stderr and "testing-secret-key" not in down.stderr
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", f"/data:s3://AKIA:secret-key@{s3_bucket}/a")
    with pytest.raises(ConfigError) as refused:
        get_settings()
    assert "secret-key" not in str(refused.value)


def test_path_lists_keep_urls_whole_and_cache_sizes_take_suffixes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert split_paths("/a:s3://b/c::/d:gs://e") == ["/a", "s3://b/c", "/d", "gs://e"]
    monkeypatch.setenv("QWEN_TASKS_OBJECT_CACHE_BYTES", "500M")
    assert get_settings().object_cache_bytes == 500 * 1024**2
    monkeypatch.setenv("QWEN_TASKS_OBJECT_CACHE_BYTES", "lots")
    with pytest.raises(ConfigError, match="QWEN_TASKS_OBJECT_CACHE_BYTES must be a byte count"):
        get_settings()


def test_object_cache_is_bounded_lru(tmp_path: Path) -> None:
    cache = sources.ObjectCache(tmp_path / "c", limit=250)
    for i, name in enumerate(["a", "b", "c"]):
        cache.put(name, bytes([i]) * 100)
        os.utime(tmp_path / "c" / name, ns=(i * 10**9, i * 10**9))
    assert cache.get("a") is None and cache.get("b") == b"\x01" * 100  # a evicted; b used now
    cache.put("d", b"d" * 100)  # over the limit again: c is the least recently used
    assert sorted(os.listdir(tmp_path / "c")) == ["b", "d"]
    cache.put("huge", b"x" * 1000)  # larger than the whole cache: not kept
    assert cache.get("huge") is None


@pytest.mark.slow
def test_labelling_reads_through_the_cache_and_checks_the_sha256(
    engine: Engine,
    database_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    prefix = f"s3://{s3_bucket}/rec"
    urls = upload_clips(tmp_path, prefix, 3)
    ingest(engine, [prefix])
    before = s3_server.object_gets(s3_bucket)
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    cache_env = {"QWEN_TASKS_OBJECT_CACHE_DIR": str(tmp_path / "object-cache")}
    labelled = run_cli(["label", "--task", "cry", *model, "--json"], database_url, **cache_env)
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    assert s3_server.object_gets(s3_bucket) == before + 3
    relabel = run_cli(["label", "--task", "cry", *model, "--relabel", "--json"], database_url, **cache_env)
    assert relabel.returncode == 0, relabel.stderr[-2000:]
    assert s3_server.object_gets(s3_bucket) == before + 3  # from the cache: no second download
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.cry_answer)).scalar_one() == 6

    # overwritten without a re-ingest: the bytes differ from what ingest hashed, so the clip fails alone
    upload(write_clips(tmp_path / "x", [1.3], seed=9)[0], urls[0])
    empty_cache = {"QWEN_TASKS_OBJECT_CACHE_DIR": str(tmp_path / "fresh-cache")}
    failed = run_cli(["label", "--task", "cry", *model, "--relabel", "--json"], database_url, **empty_cache)
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(schema.label_failure.c.error)).scalars().all()
    assert len(reasons) == 1 and "content changed since ingest: sha256" in reasons[0], failed.stderr[-2000:]

    # re-ingested: re-checked, and the new content is labelled by the next run
    summary = ingest(engine, [prefix])
    assert summary.changed == 1
    again = run_cli(["label", "--task", "cry", *model, "--json"], database_url, **empty_cache)
    assert again.returncode == 0 and last_json(again.stdout)["labelled"] == 1, again.stderr[-2000:]


@pytest.mark.slow
def test_two_workers_without_the_ingesting_machines_files_label_each_clip_once(
    engine: Engine,
    database_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    prefix = f"s3://{s3_bucket}/only-in-the-bucket"
    upload_clips(tmp_path, prefix, 6)  # no local copy is left anywhere
    ingest(engine, [prefix])
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "1"]
    planned = run_cli(["label", "--task", "cry", *model, "--plan-only", "--json"], database_url)
    assert planned.returncode == 0, planned.stderr[-2000:]
    run_id = last_json(planned.stdout)["run_id"]
    workers = []
    for name in ("gpu-a", "gpu-b"):
        home = tmp_path / name / "home"
        cwd = tmp_path / name / "cwd"
        home.mkdir(parents=True)
        cwd.mkdir()
        # another machine: its own working directory, HOME and project home; only the database URL and
        # the storage chain (AWS_* variables) in common
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QWEN_TASKS_")},
            "QWEN_TASKS_DATABASE_URL": database_url,
            "HOME": str(home),
            "QWEN_TASKS_HOME": str(home / ".qwen_tasks"),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
            ),
        }
        args = [*CLI, "work", "--run", str(run_id), "--worker-id", name, "--json"]
        workers.append(
            subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    with engine.connect() as conn:
        labelled = conn.execute(sa.select(schema.cry_answer.c.audio_id)).scalars().all()
        audio_ids = conn.execute(sa.select(schema.audio.c.id)).scalars().all()
        owners = conn.execute(sa.select(schema.label_job.c.lease_owner).distinct()).scalars().all()
    assert sorted(labelled) == sorted(audio_ids) and len(audio_ids) == 6  # every clip, once
    assert set(owners) <= {"gpu-a", "gpu-b"}
    assert s3_server.object_gets(s3_bucket) == 6 + 6  # ingest once, then each clip by one worker once
