"""The Airflow connection `qwen_tasks_s3` as s3fs storage options, against the real S3 test server."""

from __future__ import annotations

import json
import logging

import pytest
from s3_server import S3Server

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import sources
from qwen_tasks.orchestration.connection import (
    S3_ENV_VAR,
    ConnFields,
    to_storage_options,
    use_object_storage_connection,
)


def test_an_aws_connection_becomes_storage_options() -> None:
    conn = ConnFields(
        "aws", login="AKIAEXAMPLE", password="s3cret", extra={"endpoint_url": "http://minio:9000"}
    )
    assert to_storage_options(conn) == {
        "key": "AKIAEXAMPLE",
        "secret": "s3cret",
        "client_kwargs": {"endpoint_url": "http://minio:9000"},
    }
    with pytest.raises(ConfigError, match="qwen_tasks_s3 must be of type aws"):
        to_storage_options(ConnFields("postgres"))


def test_the_connection_wins_over_the_environment_and_its_secret_is_not_logged(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sources, "_options", {})  # process-wide: restored after the test
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    value = {
        "conn_type": "aws",
        "login": "conn-key-id",
        "password": "conn-secret-value",
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv(S3_ENV_VAR, json.dumps(value))
    caplog.set_level(logging.DEBUG)
    assert use_object_storage_connection(use_airflow=False)
    url = f"s3://{s3_bucket}/via-connection/a.wav"
    sources.filesystem(url).pipe_file(url, b"RIFF")
    assert sources.list_prefix(f"s3://{s3_bucket}/via-connection")[url].size == 4
    assert "conn-secret-value" not in caplog.text


def test_without_the_connection_the_standard_chain_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(S3_ENV_VAR, raising=False)
    monkeypatch.setattr(sources, "_options", {})
    assert not use_object_storage_connection(use_airflow=False)
    assert sources._options == {}
