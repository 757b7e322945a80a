"""Live review with a real Label Studio server: push, annotate through its API as reviewers do, pull.

The server is `label-studio` 1.23.2 from `.venv-label-studio` (make install-label-studio), started by the
fixture with a throwaway data folder; labels come from the tiny random-init Qwen2-Audio through the real
`label` command; push and pull run as `qwen-tasks` subprocesses against the test database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import label_studio_server
import pytest
import sqlalchemy as sa
from labelling_helpers import ingest_clips, run_cli, write_clips
from s3_server import S3Server
from services import require_label_studio
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.orchestration.review_sync import pull_step, push_step
from qwen_tasks.review.label_studio_server import ServerConfig, audio_source
from qwen_tasks.review.resolution import Vote, resolve
from qwen_tasks.store import schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _vote(label: str | None, minute: int, who: str = "a", text: str | None = None) -> Vote:
    return Vote(label, text, who, T0 + timedelta(minutes=minute), minute)


def test_resolution_rule() -> None:
    """Majority of yes/no; "can't tell" abstains; a tie goes to the most recent yes/no; only "can't
    tell" is unknown; ASR: the most common transcript, a tie to the most recent."""
    assert resolve("cry", [_vote("yes", 1), _vote("no", 2, "b"), _vote("yes", 3, "c")]).label == "yes"
    assert resolve("cry", [_vote("yes", 1), _vote("no", 2, "b")]).label == "no"
    assert resolve("cry", [_vote("no", 1), _vote("yes", 2, "b"), _vote("unknown", 3, "c")]).label == "yes"
    assert resolve("cry", [_vote("unknown", 1), _vote("unknown", 2, "b")]).label == "unknown"
    assert resolve("cry", [_vote("unknown", 1), _vote("no", 2, "b")]) == resolve("cry", [_vote("no", 2, "b")])
    assert resolve("cry", []) is None
    asr = [
        _vote(None, 1, text="a cat"),
        _vote(None, 2, "b", text="a hat "),
        _vote(None, 3, "c", text="a cat"),
    ]
    assert resolve("asr", asr).text == "a cat" and resolve("asr", asr).reviewer == "a, c"
    assert resolve("asr", asr[:2]).text == "a hat"


def test_push_without_a_server_configured_is_one_line(database_url: str) -> None:
    result = run_cli(["review", "push", "--task", "cry", "--json"], database_url, LABEL_STUDIO_URL="")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"].startswith("LABEL_STUDIO_URL is not set")
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[label_studio_server.LabelStudioServer]:
    require_label_studio()
    base = tmp_path_factory.mktemp("label-studio")
    root = base / "docroot"
    (root / "audio").mkdir(parents=True)
    started = label_studio_server.start(base / "server", root)
    try:
        yield started
    finally:
        started.stop()


def _cli(args: list[str], url: str, server: label_studio_server.LabelStudioServer, **env: str) -> Any:
    result = run_cli([*args, "--json"], url, **{**server.env(), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "cry", "to_name": "audio", "type": "choices", "value": {"choices": [label]}}]


def _rows(engine: Engine, query: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).all()


@pytest.mark.slow
def test_live_review_round_trip(
    server: label_studio_server.LabelStudioServer, engine: Engine, database_url: str, tiny_model_dir: Path
) -> None:
    from label_studio_sdk import LabelStudio

    url = database_url
    clips = ingest_clips(engine, server.document_root / "audio" / "day 1", [1.0, 1.2, 1.4, 1.6])
    ids = list(clips.values())
    for task in ("cry", "asr"):
        labelled = run_cli(["label", "--task", task, "--model", str(tiny_model_dir), "--device", "cpu",
                            "--max-new-tokens", "4"], url)  # fmt: skip
        assert labelled.returncode == 0, labelled.stderr[-3000:]

    # a wrong key: one line naming the variable, never the key
    refused = run_cli(["review", "push", "--task", "cry", "--strategy", "random", "--json"], url,
                      **{**server.env(), "LABEL_STUDIO_API_KEY": "wrong-key-123456"})  # fmt: skip
    assert refused.returncode == 1 and "LABEL_STUDIO_API_KEY" in json.loads(refused.stdout)["error"]
    assert "wrong-key-123456" not in refused.stdout + refused.stderr

    # push: one project, every clip once, the model's answer as a prediction, audio served by a storage
    pushed = _cli(["review", "push", "--task", "cry", "--strategy", "random", "--limit", "10"], url, server)
    assert pushed["pushed"] == 4 and not pushed["skipped"]
    project = pushed["projects"][0]
    assert project["title"] == "qwen-tasks day-1 cry"  # the folder's dataset
    again = _cli(["review", "push", "--task", "cry", "--strategy", "random", "--limit", "10"], url, server)
    assert again["pushed"] == 0 and again["projects"][0]["project_id"] == project["project_id"]
    # a push killed after Label Studio created the tasks, before our commit: the next push adopts them
    with engine.begin() as conn:
        conn.execute(sa.delete(schema.review_task))
    again = _cli(["review", "push", "--task", "cry", "--strategy", "random", "--limit", "10"], url, server)
    assert (again["pushed"], again["adopted"]) == (0, 4)

    ls = LabelStudio(base_url=server.url, api_key=server.token)
    tasks = {t.data["audio_id"]: t for t in ls.tasks.list(project=project["project_id"])}
    assert sorted(tasks) == sorted(ids)
    first = tasks[ids[0]]
    assert first.data["audio"] == "/data/local-files/?d=audio/day%201/clip_000.wav"
    assert first.data["question"] and first.total_predictions == 1
    prediction = ls.predictions.list(task=first.id)[0]
    query = "SELECT model_label FROM current_label WHERE audio_id = :a AND task = 'cry'"
    model = _rows(engine, query, a=ids[0])[0]
    want = {"yes": "Yes", "no": "No", "unknown": "Can't tell"}[model.model_label]
    assert prediction.result[0]["value"]["choices"] == [want] and prediction.model_version
    storages = ls.import_storage.local.list(project=project["project_id"])
    assert [s.path for s in storages] == [str(server.document_root / "audio")]
    served = ls.tasks.list(project=project["project_id"])  # the audio URL answers with the wav
    assert served
    import httpx

    wav = httpx.get(server.url + first.data["audio"], headers={"Authorization": f"Token {server.token}"})
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"

    # two reviewers: the admin and a second user (the admin creates her and records her annotations)
    second = ls.users.create(email="bea@example.org", username="bea")
    for audio_id, label, seconds in ((ids[0], "Yes", 4.0), (ids[1], "No", 5.0), (ids[2], "Yes", 6.0),
                                     (ids[3], "Can't tell", 7.0)):  # fmt: skip
        ls.annotations.create(id=tasks[audio_id].id, result=_choice(label), lead_time=seconds)
    for audio_id, label in ((ids[0], "Yes"), (ids[1], "No"), (ids[2], "No")):
        ls.annotations.create(
            id=tasks[audio_id].id, result=_choice(label), lead_time=3.0, completed_by=second.id
        )

    pulled = _cli(["review", "pull"], url, server)
    assert (pulled["new"], pulled["updated"], pulled["deleted"]) == (7, 0, 0)
    assert pulled["labels_written"] == 4 and not pulled["errors"]
    human = {r.audio_id: (r.label, r.reviewer) for r in _rows(engine, "SELECT * FROM human_label")}
    # clip 2: one yes, one no: the most recent (bea's) wins; clip 3: only "can't tell"
    assert human == {ids[0]: ("yes", "admin@example.org, bea@example.org"),
                     ids[1]: ("no", "admin@example.org, bea@example.org"),
                     ids[2]: ("no", "bea@example.org"), ids[3]: ("unknown", "admin@example.org")}  # fmt: skip
    stored = _rows(engine, "SELECT reviewer, lead_time_s FROM review_annotation WHERE audio_id = :a "
                   "ORDER BY ls_annotation_id", a=ids[0])  # fmt: skip
    assert [(r.reviewer, r.lead_time_s) for r in stored] == [
        ("admin@example.org", 4.0),
        ("bea@example.org", 3.0),
    ]
    gold = {r.audio_id: (r.gold_label, r.source) for r in _rows(engine, "SELECT * FROM cry_gold")}
    assert gold == {ids[0]: ("yes", "human"), ids[1]: ("no", "human"), ids[2]: ("no", "human")}
    latest = _rows(engine, "SELECT count(*) AS n FROM latest_label WHERE task = 'cry' AND source = 'human'")
    assert latest[0].n == 4  # current_label's triggers fired

    # agreement: pairs (yes, yes), (no, no), (yes, no): po = 2/3, pe = 2/3*1/3 + 1/3*2/3 = 4/9, kappa 0.4
    metrics = _cli(["metrics"], url, server)
    (agreement,) = metrics["review_agreement"]
    assert agreement["n_clips"] == 3 and agreement["kappa"] == pytest.approx(0.4)
    assert agreement["agreement"] == pytest.approx(2 / 3)

    # the human labels feed fine-tuning
    out = server.document_root.parent / "train.jsonl"
    _cli(["export-finetune", "--task", "cry", "--out", str(out)], url, server)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["audio_id"]: (r["label"], r["source"]) for r in rows} == {
        ids[0]: ("yes", "human"), ids[1]: ("no", "human"), ids[2]: ("no", "human")}  # fmt: skip

    # pulling again changes nothing
    before = _rows(engine, "SELECT * FROM human_label ORDER BY id")
    assert _cli(["review", "pull"], url, server) | {"projects": None} == {
        "new": 0, "updated": 0, "deleted": 0, "labels_written": 0, "labels_removed": 0, "errors": [],
        "projects": None}  # fmt: skip
    assert _rows(engine, "SELECT * FROM human_label ORDER BY id") == before

    # change one annotation, delete another in Label Studio: both follow here
    on_clip3 = ls.annotations.list(id=tasks[ids[3]].id)[0]
    ls.annotations.update(on_clip3.id, result=_choice("Yes"))
    bea_on_clip2 = [a for a in ls.annotations.list(id=tasks[ids[2]].id) if a.completed_by == second.id][0]
    ls.annotations.delete(bea_on_clip2.id)
    pulled = _cli(["review", "pull", "--task", "cry"], url, server)
    assert (pulled["new"], pulled["updated"], pulled["deleted"], pulled["labels_written"]) == (0, 1, 1, 2)
    gold = {r.audio_id: r.gold_label for r in _rows(engine, "SELECT * FROM cry_gold")}
    assert gold == {ids[0]: "yes", ids[1]: "no", ids[2]: "yes", ids[3]: "yes"}
    deleted_everything = ls.annotations.list(id=tasks[ids[1]].id)
    for annotation in deleted_everything:
        ls.annotations.delete(annotation.id)
    pulled = _cli(["review", "pull"], url, server)
    assert (pulled["deleted"], pulled["labels_removed"]) == (2, 1)
    assert ids[1] not in {r.audio_id for r in _rows(engine, "SELECT audio_id FROM human_label")}

    # ASR: a clip already reviewed is never pushed; the reviewer's transcript becomes the reference
    with engine.begin() as conn:
        conn.execute(schema.human_label.insert().values(audio_id=ids[0], task="asr", text="reviewed before"))
    # our document root one folder above Label Studio's: it refuses the storage, we say what to set
    wrong_root = {"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(server.document_root.parent)}
    refused = run_cli(["review", "push", "--task", "asr", "--strategy", "random", "--json"], url,
                      **{**server.env(), **wrong_root})  # fmt: skip
    error = json.loads(refused.stdout)["error"]
    assert refused.returncode == 1 and "LOCAL_FILES_SERVING_ENABLED=true" in error and "\n" not in error
    assert "cannot be the same as LOCAL_FILES_DOCUMENT_ROOT" in error
    pushed = _cli(["review", "push", "--task", "asr", "--strategy", "random", "--limit", "10"], url, server)
    assert pushed["pushed"] == 3
    asr_tasks = {t.data["audio_id"]: t for t in ls.tasks.list(project=pushed["projects"][0]["project_id"])}
    assert sorted(asr_tasks) == sorted(ids[1:])
    text = [
        {"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": ["one two"]}}
    ]
    ls.annotations.create(id=asr_tasks[ids[2]].id, result=text, lead_time=9.0)
    _cli(["review", "pull", "--task", "asr"], url, server)
    refs = {r.audio_id: (r.reference_text, r.source) for r in _rows(engine, "SELECT * FROM asr_reference")}
    assert refs == {ids[0]: ("reviewed before", "human"), ids[2]: ("one two", "human")}
    out = server.document_root.parent / "asr.jsonl"
    _cli(["export-finetune", "--task", "asr", "--out", str(out)], url, server)
    texts = {json.loads(line)["audio_id"]: json.loads(line)["messages"][-1]["content"] for line in out.open()}
    assert texts[ids[2]] == "one two"

    # a personal access token (what Account & Settings creates) works as LABEL_STUDIO_API_KEY as well
    personal = ls.tokens.create().token
    assert _cli(["review", "pull"], url, server, LABEL_STUDIO_API_KEY=personal)["errors"] == []

    # the DAG's steps: the same push and pull, counts only (nothing new to do here)
    config = ServerConfig.from_env(server.env())
    assert push_step({"tasks": ["cry", "asr"], "strategy": "random"}, database_url=url, config=config) == {
        "pushed": 0, "adopted": 0, "skipped": 0, "projects": 2}  # fmt: skip
    pulled = pull_step({}, database_url=url, config=config)
    assert pulled.pop("reviewed") == {}  # human labels written per task: none, so no reviews/<task> event
    assert set(pulled.values()) == {0} and len(pulled) == 6  # new, updated, deleted, labels ±, errors


def test_server_config_never_shows_the_key() -> None:
    config = ServerConfig.from_env(
        {"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "s3cr3t-key"}
    )
    assert config.url == "http://ls:8080" and "s3cr3t-key" not in repr(config)
    assert config.redact("header Token s3cr3t-key refused") == "header Token *** refused"
    with pytest.raises(ConfigError, match="must not carry a user or password"):
        ServerConfig.from_env({"LABEL_STUDIO_URL": "http://me:pw@ls:8080", "LABEL_STUDIO_API_KEY": "k"})
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY is not set"):
        ServerConfig.from_env({"LABEL_STUDIO_URL": "http://ls:8080"})


def test_audio_source_maps_local_paths_below_the_document_root() -> None:
    source = audio_source("/srv/ls/audio/day 1/a.wav", "/srv/ls")
    assert (source.kind, source.url, source.storage_path) == (
        "local", "/data/local-files/?d=audio/day%201/a.wav", "/srv/ls/audio")  # fmt: skip
    with pytest.raises(ValueError, match="not under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        audio_source("/elsewhere/a.wav", "/srv/ls")
    with pytest.raises(ValueError, match="directly in LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        audio_source("/srv/ls/a.wav", "/srv/ls")
    source = audio_source("s3://bucket/day 1/a.wav", None)  # no document root needed for bucket audio
    assert (source.kind, source.url, source.storage_path) == ("s3", "s3://bucket/day 1/a.wav", "s3://bucket")
    with pytest.raises(ValueError, match="not an object URL"):
        audio_source("s3://bucket", "/srv/ls")
    with pytest.raises(ConfigError, match="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is not set"):
        audio_source("/srv/ls/audio/a.wav", None)


def test_an_unreachable_server_is_one_line(engine: Engine, database_url: str, tmp_path: Path) -> None:
    """Runs after the round trip (its own dataset would be one more project there)."""
    ingest_clips(engine, tmp_path / "unreachable", [0.5])
    env = {"LABEL_STUDIO_URL": "http://127.0.0.1:1", "LABEL_STUDIO_API_KEY": "k3y-never-shown"}
    result = run_cli(
        ["review", "push", "--task", "cry", "--dataset", "unreachable", "--json"], database_url, **env
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = json.loads(result.stdout)["error"]
    assert error.startswith("Label Studio at http://127.0.0.1:1 is not reachable") and "k3y" not in error


@pytest.mark.slow
def test_live_review_of_bucket_audio(
    server: label_studio_server.LabelStudioServer,
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Audio only in a bucket (the real moto S3 server): ingest the prefix, label, push (Label Studio gets
    an S3 import storage on the bucket and tasks whose audio is the object URL), fetch each task's audio
    through Label Studio's presigned URL and compare bytes, annotate, pull; then calibrate on the reviewed
    labels, label again, and push the clip left: its task shows the calibrated rule that decided it."""
    import httpx
    from label_studio_sdk import LabelStudio

    from qwen_tasks.ingest import sources

    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)
    monkeypatch.setenv("QWEN_TASKS_OBJECT_CACHE_DIR", str(tmp_path / "object-cache"))
    url = database_url
    prefix = f"s3://{s3_bucket}/nursery"
    content = {}
    for path in write_clips(tmp_path / "local", [1.0, 1.3, 1.6, 1.9], seed=5):
        key = f"{prefix}/night 1/{path.name}"
        sources.filesystem(key).put_file(str(path), key)
        content[key] = path.read_bytes()
        path.unlink()  # the audio lives in the bucket only
    ingested = run_cli(["ingest", prefix, "--json"], url)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    labelled = run_cli(["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu",
                        "--max-new-tokens", "4"], url)  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr[-3000:]

    no_root = {"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": ""}  # bucket audio needs no local document root
    args = ["review", "push", "--task", "cry", "--dataset", "nursery", "--strategy", "random", "--json"]
    result = run_cli([*args, "--limit", "3"], url, **{**server.env(), **no_root})
    assert result.returncode == 0, result.stderr[-3000:]
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in result.stdout + result.stderr
    pushed = json.loads(result.stdout)
    assert pushed["pushed"] == 3 and not pushed["skipped"]
    project = pushed["projects"][0]["project_id"]

    ls = LabelStudio(base_url=server.url, api_key=server.token)
    (storage,) = ls.import_storage.s3.list(project=project)
    assert (storage.bucket, storage.prefix, storage.presign) == (s3_bucket, "nursery/night 1", True)
    assert storage.s3endpoint == s3_server.endpoint
    auth = {"Authorization": f"Token {server.token}"}
    tasks = list(ls.tasks.list(project=project, resolve_uri=False))  # as pushed
    assert len(tasks) == 3 and {t.data["audio"] for t in tasks} < set(content)
    assert all("calibration_id" not in t.data for t in tasks)  # decided by the plain threshold
    for task in tasks:  # what the browser does: the task's resolved URL, redirected to a presigned GET
        resolved = httpx.get(f"{server.url}/api/tasks/{task.id}", headers=auth).json()["data"]["audio"]
        assert not resolved.startswith("s3://")
        got = httpx.get(httpx.URL(server.url).join(resolved), headers=auth, follow_redirects=True)
        assert got.status_code == 200 and got.content == content[task.data["audio"]]
    assert s3_server.object_gets(s3_bucket) >= 3 + len(tasks)  # ingest, then Label Studio's presigned reads

    for task, label in zip(sorted(tasks, key=lambda t: t.id), ("Yes", "No", "Yes"), strict=True):
        ls.annotations.create(id=task.id, result=_choice(label), lead_time=2.0)
    pulled = _cli(["review", "pull", "--task", "cry"], url, server)
    assert (pulled["new"], pulled["labels_written"]) == (3, 3)
    ids = {t.data["audio_id"]: t.id for t in tasks}
    gold = {r.audio_id: (r.gold_label, r.source) for r in _rows(engine, "SELECT * FROM cry_gold")}
    by_task = dict(zip(sorted(ids.values()), ("yes", "no", "yes"), strict=True))
    assert gold == {a: (by_task[t], "human") for a, t in ids.items()}

    # calibrate the model on the reviewed labels, label again (decided by the rule), push the fourth clip
    model = ["--model", str(tiny_model_dir)]
    fitted = run_cli(["calibrate", "--task", "cry", *model, "--json"], url)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    rule = json.loads(fitted.stdout.strip().splitlines()[-1])
    relabelled = run_cli(["label", "--task", "cry", *model, "--device", "cpu", "--max-new-tokens", "4",
                          "--relabel"], url)  # fmt: skip
    assert relabelled.returncode == 0, relabelled.stderr[-3000:]
    again = run_cli(args, url, **{**server.env(), **no_root})
    assert json.loads(again.stdout)["pushed"] == 1, again.stderr[-3000:]
    assert len(ls.import_storage.s3.list(project=project)) == 1  # the storage (and the keys) sent once
    (fourth,) = [t for t in ls.tasks.list(project=project, resolve_uri=False) if t.id not in ids.values()]
    answer = _rows(engine, "SELECT a.* FROM cry_answer a JOIN current_label c ON c.run_id = a.run_id AND "
                   "c.audio_id = a.audio_id AND c.task = 'cry' WHERE a.audio_id = :a AND a.method = 'score'",
                   a=fourth.data["audio_id"])[0]  # fmt: skip
    assert answer.calibration_id == rule["calibration_id"]
    assert fourth.data["calibration_id"] == rule["calibration_id"]
    assert (fourth.data["threshold"], fourth.data["p_calibrated"]) == (answer.threshold, answer.p_calibrated)
    got = httpx.get(httpx.URL(server.url).join(
        httpx.get(f"{server.url}/api/tasks/{fourth.id}", headers=auth).json()["data"]["audio"]),
        headers=auth, follow_redirects=True)  # fmt: skip
    assert got.content == content[fourth.data["audio"]]

    # the S3 secret is in Label Studio's storage settings (its purpose), nowhere in our database
    with engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            assert secret not in repr(conn.execute(sa.select(table)).all()), table.name


def test_s3_access_is_what_we_read_the_bucket_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label Studio's S3 storage gets the DAG connection's storage options when set, else the AWS chain;
    the secret parts never show in a repr and are masked by `redact`."""
    from qwen_tasks.ingest import sources
    from qwen_tasks.orchestration.connection import ConnFields, to_storage_options

    monkeypatch.setattr(sources, "_options", {})
    chain_env = {"AWS_ACCESS_KEY_ID": "chain-key", "AWS_SECRET_ACCESS_KEY": "chain-secret",
                 "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}  # fmt: skip
    for name, value in chain_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    chain = sources.s3_access()
    assert (chain.key, chain.secret, chain.endpoint, chain.region) == (
        "chain-key", "chain-secret", "http://minio:9000", "eu-west-1")  # fmt: skip
    assert "chain-secret" not in repr(chain) and "chain-key" not in repr(chain)
    assert chain.redact("denied for chain-key/chain-secret") == "denied for ***/***"

    conn = ConnFields("aws", login="conn-key", password="conn-secret",
                      extra={"endpoint_url": "http://ceph:7480", "region_name": "us-east-2"})  # fmt: skip
    sources.set_storage_options("s3", to_storage_options(conn))
    dag = sources.s3_access()
    assert (dag.key, dag.secret, dag.endpoint, dag.region) == ("conn-key", "conn-secret", "http://ceph:7480",
                                                               "us-east-2")  # fmt: skip
