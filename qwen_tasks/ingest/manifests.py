"""Parsing the jsonl manifests users already have, one line at a time.

Two formats, as the original Qwen-Audio evaluation scripts read them: ASR `{"audio", "text"[, "language"]
[, "source"]}` or the stock `{"audio", "gt", "source"}` (gt = the reference), and audio QA / cry
`{"question", "audio", "gt", "source"}` (each line's own question is what labelling asks by default).
A bad line is reported with its file and line number and skipped, so one typo never costs the rest of
the manifest. That includes lines that are valid JSON but cannot be stored: PostgreSQL text
and jsonb hold neither NUL (`\u0000`) nor lone UTF-16 surrogates (`\ud800`), and jsonb has no NaN.
A line's `question` is asked of its clip as written, so it follows the rule of the `question` option
(at most 1,000 characters, no control characters: `records.question_problem`), else the line is bad.
Relative audio paths resolve against the manifest's folder, as users expect when they move a dataset
folder around.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from qwen_tasks.records import is_url, normal_url, question_problem, redact_url, url_problem

ManifestKind = Literal["asr", "aqa"]
KINDS: tuple[ManifestKind, ...] = ("asr", "aqa")

# Gold labels written by people: English, Chinese (哭/不哭 style), booleans and 1/0.
_YES = frozenset(
    {"yes", "y", "true", "t", "1", "positive", "pos", "cry", "crying", "baby crying", "是", "是的", "对",
     "有", "哭", "在哭", "哭了", "有哭声", "哭声", "婴儿哭", "宝宝哭"}
)  # fmt: skip
_NO = frozenset(
    {"no", "n", "false", "f", "0", "negative", "neg", "not crying", "no cry", "no crying", "not cry",
     "non cry", "noncry", "否", "不是", "不对", "没有", "无", "不", "不哭", "没哭", "没有哭", "没在哭",
     "没有哭声", "无哭声", "不是哭声"}
)  # fmt: skip
# "Yes, a baby is crying." / "No." / "是的，在哭": a clear yes/no word, then punctuation.
_LEADING = re.compile(r"^(yes|no|是的|是|不是|没有|有)\s*[,.;:!，。；：！]")
_EDGE_PUNCT = " \t\r\n\"'`.,;:!?()[]{}<>。，；：！？、“”‘’（）【】《》"


@functools.lru_cache(maxsize=4096)  # a manifest repeats a handful of gt values, 100k times over
def _gold_from_text(gt: str) -> Literal["yes", "no"] | None:
    text = re.sub(r"[\s_\-]+", " ", gt.strip().lower())
    word = text.strip(_EDGE_PUNCT)
    if word in _YES:
        return "yes"
    if word in _NO:
        return "no"
    lead = _LEADING.match(text)
    if lead:
        return "no" if lead.group(1) in ("no", "不是", "没有") else "yes"
    return None


def parse_gold_label(gt: object) -> Literal["yes", "no"] | None:
    """'yes' / 'no' when `gt` clearly says so (yes/no/true/false/1/0/哭/不哭/有/没有/是/否 ...), else None."""
    if isinstance(gt, bool):
        return "yes" if gt else "no"
    if isinstance(gt, int | float) and gt in (0, 1):
        return "yes" if gt == 1 else "no"
    if not isinstance(gt, str):
        return None
    return _gold_from_text(gt)


@dataclass(slots=True)  # not frozen: a frozen __init__ sets each field through object.__setattr__, 4x slower
class ManifestItem:
    """One valid manifest line, with its audio path made absolute (not yet checked to exist)."""

    manifest_path: str
    line_no: int
    kind: ManifestKind
    audio_path: str
    reference_text: str | None
    language: str | None
    question: str | None
    gt: str | None
    gold_label: str | None
    source: str | None
    raw: dict[str, Any]
    line: str = ""  # the line as written (what `raw` was decoded from); stored as jsonb verbatim


def line_hash(line: str) -> int:
    """A signed 64-bit BLAKE2b digest of a line as written (manifest_item.line_hash): equal lines, equal
    hashes, so a re-ingest can tell an unchanged line from its stored row without comparing the JSON."""
    digest = hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class ManifestError:
    """A line that was skipped, and why ("line" 0 = the manifest itself could not be read)."""

    manifest: str
    line: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"manifest": self.manifest, "line": self.line, "reason": self.reason}


def _as_text(value: Any) -> str | None:
    """A field as stored in a text column: strings as they are, other JSON values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _unstorable(value: Any, where: str = "") -> str | None:
    """Why a decoded JSON value cannot be stored in PostgreSQL text/jsonb, or None when it can.

    json.loads accepts `\u0000` and unpaired surrogate escapes (`\ud800`, `\udcff`); PostgreSQL rejects
    both, and one such string would otherwise abort the whole chunk's transaction.
    """
    if isinstance(value, str):
        if "\x00" in value:
            return f"contains a NUL character (\\u0000){where}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains a lone surrogate escape (\\u{ord(value[exc.start]):04x}){where}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            reason = _unstorable(key, f" in a key{where}") or _unstorable(item, where or f' in "{key}"')
            if reason:
                return reason
    elif isinstance(value, list):
        for item in value:
            reason = _unstorable(item, where)
            if reason:
                return reason
    return None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# json.loads without NaN/Infinity or floats beyond double range (JSON and jsonb have neither). One decoder:
# json.loads(text, **hooks) would build a new one per line.
_decode = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float).decode


@functools.lru_cache(maxsize=4096)
def _resolve_folder(manifest_path: str, sub: str) -> str:
    return os.path.abspath(os.path.join(os.path.dirname(manifest_path), os.path.expanduser(sub)))


def _resolve(manifest_path: str, audio: str) -> str:
    """`audio` made absolute against the manifest's folder and normalised, like os.path.abspath, with
    the folder part resolved once per distinct folder (most of the cost on a 100k-line manifest)."""
    sub, sep, name = audio.rpartition("/")
    if name in ("", ".", "..") or (not sep and name.startswith("~")):
        return _resolve_folder(manifest_path, audio)
    base = _resolve_folder(manifest_path, sub + sep)
    return base + name if base.endswith("/") else f"{base}/{name}"


def _locate(manifest_path: str, audio: str) -> str | None:
    """Where a line's `audio` is: an object URL as stored (`s3://b/k`), a path relative to a manifest in a
    bucket resolved against its prefix, else a local path (`_resolve`); None when it cannot be (see
    `_location_problem`)."""
    if is_url(audio):
        return normal_url(audio) if url_problem(audio) is None else None
    if is_url(manifest_path):
        from qwen_tasks.ingest import sources

        return sources.join(sources.parent(manifest_path), audio)
    return _resolve(manifest_path, audio)


def _location_problem(manifest_path: str, audio: str) -> str:
    if is_url(audio):
        return f"{redact_url(audio)}: {url_problem(audio)}"
    return (
        f"{audio!r} is absolute or climbs out of the bucket of {manifest_path}; give a URL or a relative path"
    )


def _infer_kind(obj: dict[str, Any]) -> ManifestKind | None:
    """asr for `text`, and for the stock Qwen-Audio ASR lines (`gt` is the reference, no `question`)
    unless that `gt` is a yes/no answer; aqa for a `question`, or a yes/no `gt` alone."""
    if "text" in obj:
        return "asr"
    if "question" in obj:
        return "aqa"
    if "gt" in obj:
        gt = obj["gt"]
        return "asr" if isinstance(gt, str) and parse_gold_label(gt) is None else "aqa"
    return None


def _reference(obj: dict[str, Any]) -> Any:
    """An ASR line's reference transcript: `text`, else `gt` (the original Qwen-Audio's eval manifests,
    `{"audio", "gt", "source"}`, which its evaluate_asr.py scores against)."""
    if "text" in obj:
        return obj["text"]
    return None if "question" in obj else obj.get("gt")  # a question makes it an audio-QA line


def parse_line(
    obj: Any, manifest_path: str, line_no: int, kind: ManifestKind | None, line: str | None = None
) -> ManifestItem | ManifestError:
    """Validate one decoded JSON value as a manifest row of `kind` (inferred from its keys when None).

    `line` is the text `obj` was decoded from, when there is one: it is kept verbatim as the row's `raw`.
    """

    def error(reason: str) -> ManifestError:
        return ManifestError(manifest_path, line_no, reason)

    if not isinstance(obj, dict):
        return error(f"expected a JSON object, got {type(obj).__name__}")
    audio = obj.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        return error('missing "audio" (a non-empty string path)')
    # NUL and surrogates can only come from \u escapes (json.loads refuses raw control characters, and a
    # raw surrogate is invalid UTF-8), so the deep check runs only where the line has one.
    if line is None or "\\u" in line:
        unstorable = _unstorable(obj)
        if unstorable:
            return error(unstorable)
    line_kind = kind or _infer_kind(obj)
    if line_kind is None:
        return error('cannot tell the kind: need "text" (asr) or "question"/"gt" (aqa)')
    if line_kind == "asr" and not isinstance(_reference(obj), str):
        return error('not an asr line: no reference transcript ("text", or "gt" without a "question")')
    if line_kind == "aqa" and "gt" not in obj and "question" not in obj:
        return error('not an aqa line: missing "question" and "gt"')
    get = obj.get
    question = _as_text(get("question"))
    if question is not None:
        problem = question_problem(question)  # the rule of the `question` option: it is asked as is
        if problem:
            return error(f'"question" {problem}')
    gt = get("gt")
    audio_path = _locate(manifest_path, audio)
    if audio_path is None:
        return error(f'"audio" {_location_problem(manifest_path, audio)}')
    return ManifestItem(
        manifest_path=manifest_path,
        line_no=line_no,
        kind=line_kind,
        audio_path=audio_path,
        reference_text=_reference(obj) if line_kind == "asr" else None,
        language=_as_text(get("language")),
        question=question,
        gt=_as_text(gt),
        gold_label=parse_gold_label(gt) if gt is not None and line_kind == "aqa" else None,
        source=_as_text(get("source")),
        raw=obj,
        line=line if line is not None else json.dumps(obj, ensure_ascii=False),
    )


def _opened_path(fd: int, fallback: str) -> str:
    """Where an open file really is (/proc names the inode held on Linux)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback


def _open_local(manifest_path: str, roots: Sequence[str] | None) -> BinaryIO | str:
    """The open manifest, or why it may not be read. With `roots`, its real path is resolved and that very
    path opened (a final symlink refused), then the open file's own location checked again."""
    from qwen_tasks.ingest.audio_files import within_roots as _within  # the one rule, shared with audio

    real = os.path.realpath(manifest_path) if roots is not None else manifest_path
    if roots is not None and not _within(real, roots):
        return "outside allowed roots"
    try:
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if roots is not None else 0)
        handle = os.fdopen(os.open(real, flags), "rb")
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        return f"cannot read manifest: {reason}"
    if roots is not None and not _within(_opened_path(handle.fileno(), real), roots):
        handle.close()
        return "outside allowed roots"
    return handle


def _open_object(url: str, roots: Sequence[str] | None) -> BinaryIO | str:
    """A manifest stored as an object (read whole: manifests are text), or why it may not be read."""
    from qwen_tasks.ingest import sources
    from qwen_tasks.ingest.audio_files import within_roots as _within

    problem = url_problem(url)
    if problem:
        return problem
    url = normal_url(url)
    if roots is not None and not _within(url, roots):
        return "outside allowed roots"
    try:
        return io.BytesIO(sources.read_bytes(url))
    except FileNotFoundError:
        return "cannot read manifest: no such object"
    except PermissionError:
        return "cannot read manifest: permission denied"
    except (OSError, ValueError) as exc:
        return f"cannot read manifest: {type(exc).__name__}: {exc}"


def read_manifest(
    path: str | Path, kind: ManifestKind | None = None, *, roots: Sequence[str] | None = None
) -> Iterator[ManifestItem | ManifestError]:
    """Yield one ManifestItem or ManifestError per non-blank line; never raises for bad content.

    Lines are decoded one by one, so a stray non-UTF-8 byte costs one line, not the file.
    `roots` (real paths): the manifest must really lie under one of them, judged when it is opened: its
    real path is resolved and that very path opened (a final symlink refused), then the open file's own
    location checked again, so a name swapped for a symlink after ingest's check reads nothing.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(path, str) and is_url(path):
        opened = _open_object(path, roots)
        manifest_path = normal_url(path) if url_problem(path) is None else path
    else:
        manifest_path = os.path.abspath(path)
        opened = _open_local(manifest_path, roots)
    if isinstance(opened, str):
        yield ManifestError(manifest_path, 0, opened)
        return
    with opened as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield ManifestError(manifest_path, line_no, f"not valid UTF-8 ({exc.reason})")
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            text = text.strip()  # what is stored as `raw` and hashed: the line without its newline
            if not text:
                continue
            try:
                obj = _decode(text)
            except json.JSONDecodeError as exc:
                yield ManifestError(manifest_path, line_no, f"bad JSON: {exc.msg} at column {exc.colno}")
                continue
            except (ValueError, RecursionError) as exc:  # NaN/Infinity; nesting deeper than Python's stack
                reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
                yield ManifestError(manifest_path, line_no, f"bad JSON: {reason}")
                continue
            yield parse_line(obj, manifest_path, line_no, kind, text)
