"""Airflow assets of the workflow: their names, what an event carries, and what an event-started run does.

Why: the DAGs react to data instead of waiting for the night. Three kinds of asset, one URI scheme:
- `qwen_tasks://dataset/<name>`: a dataset received new audio. The ingest DAG emits one event per such
  dataset, through the alias `NEW_AUDIO_ALIAS` (datasets are data, not known when a DAG file is parsed);
- `qwen_tasks://model/<task>`: a model version was promoted for the task (fine-tune DAG, or `qwen-tasks
  models promote` through Airflow's REST API);
- `qwen_tasks://reviews/<task>`: reviewed labels of the task were imported (`qwen-tasks review-import`
  through the REST API).
An event's extra holds names, ids and counts only (dataset name and id, new clip count, where it came
from): never audio, rows or credentials, since the UI shows it to everyone.

`scope_of(events)` turns the events that started a labelling run into what that run labels (only the
datasets that changed; only the task whose model was promoted) and the one line that says why it ran.
Plain data in, plain data out: no Airflow import here, so the DAGs, the CLI and the tests share it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.records import Task

SCHEME = "qwen_tasks"
NEW_AUDIO_ALIAS = "qwen_tasks_new_audio"  # resolves to the dataset assets that got events
PROMOTED_ALIAS = "qwen_tasks_promoted_model"  # the fine-tune DAG's promote task: an event only on promotion
NEW_REVIEWS_ALIAS = "qwen_tasks_new_reviews"  # the review-sync DAG's pull: reviews/<task> events
_URI = re.compile(rf"^{SCHEME}://(dataset|model|reviews)/([A-Za-z0-9][A-Za-z0-9._-]{{0,99}})$")
_USERINFO = re.compile(r"(?<=://)[^/@]*@")  # user:secret@ in a URL


def dataset_uri(name: str) -> str:
    return f"{SCHEME}://dataset/{name}"


def model_uri(task: str) -> str:
    return f"{SCHEME}://model/{task}"


def reviews_uri(task: str) -> str:
    return f"{SCHEME}://reviews/{task}"


def parse_uri(uri: str) -> tuple[str, str] | None:
    """(kind, name) of one of our asset URIs: ("dataset", "calls"), ("model", "cry"); None otherwise."""
    match = _URI.match(uri or "")
    return (match.group(1), match.group(2)) if match else None


def safe_location(location: str) -> str:
    """A source location fit for an event's extra: credentials in a URL (`s3://key:secret@bucket/...`)
    are removed."""
    return _USERINFO.sub("", location)


@dataclass(frozen=True)
class Event:
    """One asset event, as a run sees it: the asset's URI, the event's extra and where it came from
    (`dag_id/run_id/task_id` of the task that emitted it, else the extra's `source`, e.g. a REST call)."""

    uri: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def describe(self) -> str:
        kind_name = parse_uri(self.uri)
        extra = dict(self.extra or {})
        what = self.uri
        if kind_name and kind_name[0] == "dataset":
            what = f"dataset {kind_name[1]}: {extra.get('new_clips', '?')} new clip(s)"
        elif kind_name and kind_name[0] == "model":
            what = f"{kind_name[1]} model {extra.get('version', '?')} promoted"
        elif kind_name and kind_name[0] == "reviews":
            what = f"{kind_name[1]}: {extra.get('reviewed', '?')} reviewed label(s) imported"
        return f"{what} (from {self.source or extra.get('source') or 'unknown'})"


def events_from_airflow(triggering: Any) -> list[Event]:
    """The plain events of a run's `triggering_asset_events` (a mapping of asset or alias to event list;
    empty on a cron or manual run). An event emitted through an alias is listed under the alias and
    under its asset: each event is kept once."""
    out: dict[tuple[str, str, str, str], Event] = {}
    for key in list(triggering or {}):
        for ev in triggering[key]:
            asset = getattr(ev, "asset", None)
            uri = getattr(asset, "uri", None) or getattr(key, "uri", "") or ""
            parts = [getattr(ev, n, None) for n in ("source_dag_id", "source_run_id", "source_task_id")]
            extra = dict(getattr(ev, "extra", None) or {})
            source = "/".join(p for p in parts if p)
            when = str(getattr(ev, "timestamp", ""))
            out.setdefault(
                (uri, source, when, json.dumps(extra, sort_keys=True, default=str)), Event(uri, extra, source)
            )
    return list(out.values())


@dataclass(frozen=True)
class RunScope:
    """What an event-started labelling run labels: `tasks` / `datasets` replace the params' (None: as the
    params say, i.e. a cron or manual run), and `reason`, the line that says why the run started."""

    reason: str
    tasks: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None

    def apply(self, params: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(params)
        if self.tasks is not None:
            out["tasks"] = list(self.tasks)
        if self.datasets is not None:
            out["datasets"] = list(self.datasets)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "tasks": self.tasks, "datasets": self.datasets}


def scope_of(events: Sequence[Event], params: Mapping[str, Any] | None = None) -> RunScope:
    """What to label for the events that started a run.

    - no events (cron or manual run): everything the params say;
    - new-audio events only: the datasets that changed, for the params' tasks;
    - model events only: the promoted tasks (among the params'), every dataset of theirs;
    - both: everything (a model event relabels whole tasks anyway; the planner skips what is labelled).
    The planner never plans a labelled clip twice, so two events for the same data plan no duplicate work.
    """
    parsed = [(parse_uri(e.uri), e) for e in events]
    datasets = list(dict.fromkeys(k[1] for k, _ in parsed if k and k[0] == "dataset"))
    models = list(dict.fromkeys(k[1] for k, _ in parsed if k and k[0] == "model" and k[1] in set(Task)))
    if not events:
        return RunScope("scheduled or manual run: every dataset of the requested tasks")
    why = "asset events: " + "; ".join(e.describe() for e in events)
    if models and not datasets:
        wanted = [t for t in (params or {}).get("tasks") or tuple(Task) if t in models]
        return RunScope(why, tasks=tuple(wanted or models))
    if datasets and not models:
        return RunScope(why, datasets=tuple(datasets))
    return RunScope(why)


# --- the ingest DAG's events ------------------------------------------------------------------------


def new_audio_events(engine: Engine, ingested: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One event per dataset that received new audio in an ingest (`IngestSummary.datasets`): the asset
    URI and its extra (dataset name and id, new clip count, the dataset's sources). Unchanged datasets
    get none, so a quiet 15-minute listing starts nothing."""
    from qwen_tasks.store.schema import dataset, dataset_source

    grown = {str(d["name"]): int(d.get("clips_added") or 0) for d in ingested if d.get("clips_added")}
    if not grown:
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(dataset.c.id, dataset.c.name, dataset_source.c.location)
            .join(dataset_source, dataset_source.c.dataset_id == dataset.c.id, isouter=True)
            .where(dataset.c.name.in_(list(grown)))
            .order_by(dataset.c.name, dataset_source.c.location)
        ).all()
    ids: dict[str, int] = {}
    sources: dict[str, list[str]] = {}
    for r in rows:
        ids[r.name] = int(r.id)
        if r.location:
            sources.setdefault(r.name, []).append(safe_location(r.location))
    return [
        {
            "uri": dataset_uri(name),
            "extra": {
                "dataset": name,
                "dataset_id": ids.get(name),
                "new_clips": n,
                "source": ", ".join(sources.get(name, [])[:5]) or "ingest",
            },
        }
        for name, n in grown.items()
    ]
