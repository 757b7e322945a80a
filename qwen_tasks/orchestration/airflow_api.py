"""Asset events posted from outside Airflow, through its REST API (v2): what the CLI uses to start runs.

Why: inside Airflow a task emits an asset event by declaring an outlet; `qwen-tasks models promote`,
`qwen-tasks review-import` and `qwen-tasks review pull` run outside it, so they ask the API server instead
(`POST /api/v2/assets/events`), and the DAG scheduled on that asset starts within a scheduler loop.

Configuration (environment only, read here when a call is made): `QWEN_TASKS_AIRFLOW_URL` (the API
server, e.g. http://airflow:8080; unset: no event is posted and the caller says so), and either
`QWEN_TASKS_AIRFLOW_TOKEN` (a JWT) or `QWEN_TASKS_AIRFLOW_USERNAME` + `QWEN_TASKS_AIRFLOW_PASSWORD`
(exchanged for a token at `POST /auth/token`). Credentials never appear in a message, a log line or the
event: errors name the URL and the HTTP status only.

Standard library only (urllib): two JSON requests do not justify a client dependency.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from qwen_tasks.config import get_settings
from qwen_tasks.errors import QwenTasksError

URL_VAR = "QWEN_TASKS_AIRFLOW_URL"
TOKEN_VAR = "QWEN_TASKS_AIRFLOW_TOKEN"
USER_VAR, PASSWORD_VAR = "QWEN_TASKS_AIRFLOW_USERNAME", "QWEN_TASKS_AIRFLOW_PASSWORD"
TIMEOUT_S = 20.0


class AirflowApiError(QwenTasksError):
    """The API server could not be reached, refused the credentials, or does not know the asset."""


@dataclass(frozen=True)
class PostedEvent:
    """What the API server recorded: the event's id, its asset and its extra."""

    event_id: int
    asset_id: int
    uri: str
    extra: dict[str, Any]


def configured() -> bool:
    return bool(get_settings().airflow_url)


def _request(method: str, url: str, body: dict[str, Any] | None, token: str | None) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    shown = url.split("?", 1)[0]
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        why = {401: "credentials refused", 403: "not allowed"}.get(exc.code, exc.reason)
        raise AirflowApiError(f"{method} {shown}: HTTP {exc.code} ({why})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AirflowApiError(f"{method} {shown}: cannot reach the Airflow API server ({reason})") from None


def _token(base: str) -> str | None:
    token = os.environ.get(TOKEN_VAR, "").strip()
    if token:
        return token
    user, password = os.environ.get(USER_VAR, ""), os.environ.get(PASSWORD_VAR, "")
    if not user:
        return None  # an API server without authentication
    got = _request("POST", f"{base}/auth/token", {"username": user, "password": password}, None)
    if not isinstance(got, dict) or not got.get("access_token"):
        raise AirflowApiError(f"POST {base}/auth/token: no access_token in the answer")
    return str(got["access_token"])


def post_asset_event(uri: str, extra: dict[str, Any]) -> PostedEvent:
    """Record an asset event on the asset `uri` (it must exist: a DAG that uses it has been parsed).
    Raises AirflowApiError with one line; ConfigError-free when QWEN_TASKS_AIRFLOW_URL is unset is the
    caller's job (`configured()`)."""
    base = get_settings().airflow_url
    if not base:
        raise AirflowApiError(f"{URL_VAR} is not set")
    token = _token(base)
    query = urllib.parse.urlencode({"uri_pattern": uri, "limit": 100})
    found = _request("GET", f"{base}/api/v2/assets?{query}", None, token)
    ids = [a["id"] for a in (found or {}).get("assets", []) if a.get("uri") == uri]
    if not ids:
        raise AirflowApiError(
            f"Airflow at {base} has no asset {uri} (are the qwen_audio_* DAGs deployed and parsed?)"
        )
    event = _request("POST", f"{base}/api/v2/assets/events", {"asset_id": ids[0], "extra": extra}, token)
    return PostedEvent(int(event.get("id") or 0), int(ids[0]), uri, dict(event.get("extra") or {}))
