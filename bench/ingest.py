"""Ingest benchmark: `sha256sum` vs a first ingest vs an unchanged re-run, on the same generated files.

    python bench/ingest.py                       # 10,000 x 1 s clips (about 320 MB in a temp folder)
    python bench/ingest.py --n 2000 --registered 100000
    python bench/ingest.py --manifest --n 10000 --registered 90000   # the same through a jsonl manifest
    python bench/ingest.py --n 2000 --bucket     # and the same clips as objects on a local S3 server

Targets (issue 4, folders): first ingest <= 2x the sha256sum time; unchanged re-run over 100k registered
files < 5 s. Targets (issue 14, `--manifest`): first manifest ingest <= 2x sha256sum over the same files;
unchanged re-run of a 100k-line manifest < 3 s. `--registered M` adds M more files that are hard links to
one clip (no disk space, but real directory entries to stat) and registers them directly in the database,
so the unchanged re-run can be timed at scale without hashing M files first. With `--manifest` the N clips
are named by one AQA manifest (relative paths, as users write them) and the M registered files by a
second one; that second manifest is ingested once (its lines are new, its files known) before the
unchanged re-run of both manifests is timed. The run uses a throwaway database on the configured server
(QWEN_TASKS_DATABASE_URL, or the embedded one) unless --database-url names one; it is dropped at the end.
Page cache is warm for every timing (the files were just written); sha256sum is single-threaded.

`--bucket` (issue 22) also uploads the N clips to a local S3 server (moto's server mode, the one the tests
start: tests/s3_server.py) and times a first ingest of `s3://bench/clips` and an unchanged re-run,
printed beside the folder figures, with the object downloads the server logged during each (target:
unchanged re-run of 2,000 objects < 2 s, no object downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_tasks.ingest.audio_files import check_file  # noqa: E402
from qwen_tasks.ingest.register import audio_row, ingest  # noqa: E402
from qwen_tasks.store import database as db  # noqa: E402
from qwen_tasks.store import schema  # noqa: E402


def write_clips(folder: Path, n: int, seconds: float, rate: int) -> list[Path]:
    """N distinct mono PCM_16 wav clips: one header written by soundfile, then raw noise samples."""
    folder.mkdir(parents=True)
    template = folder / "template.wav"
    frames = int(seconds * rate)
    sf.write(template, np.zeros(frames, dtype=np.int16), rate, subtype="PCM_16")
    header = template.read_bytes()[: -frames * 2]
    template.unlink()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"clip_{i:06d}.wav"
        path.write_bytes(header + rng.integers(-3000, 3000, frames, dtype=np.int16).tobytes())
        paths.append(path)
    return paths


def register_links(engine: sa.Engine, folder: Path, source: Path, m: int, root: Path) -> list[Path]:
    """M hard links to copies of `source`, registered as ok rows pointing at its (real) audio row, as
    admitted by allowed root `root` (what ingest would record, so the re-run has nothing to update)."""
    folder.mkdir(parents=True)
    checked = check_file(source)
    rows = []
    copies = folder.parent / "link-sources"  # ext4 allows 65000 links per inode: one copy per 50000
    copies.mkdir()
    for i in range(m):
        if i % 50_000 == 0:
            target = copies / f"source_{i // 50_000}.wav"
            shutil.copyfile(source, target)
            mtime_ns = target.stat().st_mtime_ns
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"link_{i:06d}.wav"
        os.link(target, path)
        rows.append(
            {"path": str(path), "size_bytes": checked.size_bytes, "mtime_ns": mtime_ns, "status": "ok"}
        )
        if "root" in schema.audio_file.c:  # (absent before migration 0006: the bench also runs on old code)
            rows[-1]["root"] = str(root.resolve())
    with engine.begin() as conn:
        audio_id = conn.execute(
            sa.dialects.postgresql.insert(schema.audio)
            .values(audio_row(checked))
            .on_conflict_do_update(index_elements=["sha256"], set_={"size_bytes": checked.size_bytes})
            .returning(schema.audio.c.id)
        ).scalar_one()
        for r in rows:
            r["audio_id"] = audio_id
        for i in range(0, len(rows), 10_000):
            conn.execute(sa.insert(schema.audio_file), rows[i : i + 10_000])
    return [Path(r["path"]) for r in rows]


def write_manifest(path: Path, audio: list[Path], gt_every: int = 2) -> Path:
    """An audio-QA manifest naming `audio` relative to its own folder, one line per file."""
    lines = []
    for i, p in enumerate(audio):
        rel = os.path.relpath(p, path.parent)
        gt = "yes" if i % gt_every else "no"
        lines.append(
            json.dumps({"question": "Is there a baby crying?", "audio": rel, "gt": gt, "source": "bench"})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    print(f"  {label:<44} {elapsed:8.2f} s", flush=True)
    return elapsed, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="clips to generate (default 10000)")
    parser.add_argument("--seconds", type=float, default=1.0, help="clip length (default 1.0)")
    parser.add_argument("--rate", type=int, default=16_000, help="sample rate (default 16000)")
    parser.add_argument("--registered", type=int, default=0, help="extra registered files (e.g. 100000)")
    parser.add_argument("--manifest", action="store_true", help="ingest through jsonl manifests, not folders")
    parser.add_argument("--workers", type=int, default=None, help="ingest threads (default: ingest's)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--database-url", default=None, help="use this database instead of a temp one")
    parser.add_argument("--bucket", action="store_true", help="also the same clips in a local S3 bucket")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qt-bench-ingest-", dir=args.dir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if args.database_url:
            url = args.database_url
        else:  # a throwaway database on the configured server (or the embedded one)
            url = stack.enter_context(db.scratch_database(db.resolve_url(), prefix="qwen_tasks_bench"))
        engine = db.get_engine(url)
        db.upgrade(engine)

        print(f"generating {args.n} x {args.seconds:g} s clips at {args.rate} Hz in {work} ...", flush=True)
        clips = write_clips(work / "clips", args.n, args.seconds, args.rate)
        size_mb = sum(p.stat().st_size for p in clips) / 1e6
        folders = [work / "clips"]
        linked: list[Path] = []
        if args.registered:
            print(f"registering {args.registered} hard-linked files ...", flush=True)
            t0 = time.perf_counter()
            source = work / "link-source.wav"  # content not among the N clips, so counts stay exact
            sf.write(source, np.full(int(args.seconds * args.rate), 5, dtype=np.int16), args.rate)
            root = work if args.manifest else work / "registered"  # the manifest's folder, or the folder
            linked = register_links(engine, work / "registered", source, args.registered, root)
            print(f"  (registered in {time.perf_counter() - t0:.1f} s)")
            folders.append(work / "registered")

        how = "manifest lines" if args.manifest else "files"
        print(
            f"\n{args.n} {how}, {size_mb:.0f} MB, {os.cpu_count()} CPUs, "
            f"database {db.printable_location(engine.url)}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        if args.manifest:
            first_inputs: dict = {
                "paths": [],
                "manifests": [(write_manifest(work / "clips.jsonl", clips), "aqa")],
            }
            again_inputs = dict(first_inputs)
            if linked:
                registered = (write_manifest(work / "registered.jsonl", linked), "aqa")
                again_inputs = {"paths": [], "manifests": [*first_inputs["manifests"], registered]}
        else:
            first_inputs = {"paths": [work / "clips"]}
            again_inputs = {"paths": folders}
        listing = b"\0".join(os.fsencode(p) for p in clips)
        sha_s, _ = timed(
            "sha256sum (xargs, one process)",
            lambda: subprocess.run(
                ["xargs", "-0", "sha256sum"], input=listing, stdout=subprocess.DEVNULL, check=True
            ),
        )
        first_s, first = timed(
            f"first ingest ({args.n} new {how})", lambda: ingest(engine, **first_inputs, workers=args.workers)
        )
        if args.manifest and linked:
            timed(
                f"  (+ {len(linked)} manifest lines, files known)",
                lambda: ingest(engine, [], manifests=[again_inputs["manifests"][-1]], workers=args.workers),
            )
        total = args.n + args.registered
        again_s, again = timed(
            f"second ingest, nothing changed ({total} {how})",
            lambda: ingest(engine, **again_inputs, workers=args.workers),
        )
        if first.new != args.n or again.unchanged != total:
            raise SystemExit(f"unexpected counts: first {first.to_dict()}, second {again.to_dict()}")

        target = 3 if args.manifest else 5
        print(f"\n  first ingest / sha256sum   {first_s / sha_s:6.2f}x   (target <= 2x)")
        print(f"  unchanged / first ingest   {again_s / first_s:6.3f}x")
        print(f"  first ingest rate          {args.n / first_s:8.0f} {how}/s, {size_mb / first_s:.0f} MB/s")
        print(f"  unchanged re-run rate      {total / again_s:8.0f} {how}/s", end="")
        if total >= 100_000:
            met = "met" if again_s * 100_000 / total < target else "NOT met"
            print(f"   (target < {target} s for 100k: {met})")
        else:
            print("   (time 100k with --registered)")
        print(f"  load average now           {os.getloadavg()[0]:.2f}")
        if args.bucket:
            bucket_case(engine, work, clips, first_s, again_s, args.workers)


def bucket_case(
    engine: sa.Engine,
    work: Path,
    clips: list[Path],
    folder_first: float,
    folder_again: float,
    workers: int | None,
) -> None:
    """The same clips as objects on a local S3 server: a first ingest and an unchanged re-run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import S3Server  # tests/s3_server.py: moto's server mode on a free port

    from qwen_tasks.ingest import sources

    server = S3Server(work / "s3-requests.log").start()
    try:
        os.environ.update(server.env)
        prefix = "s3://bench/clips"
        fs = sources.filesystem(prefix)
        fs.mkdir("bench")
        print(f"\nuploading {len(clips)} objects to {server.endpoint} ...", flush=True)
        fs.put([str(p) for p in clips], [f"{prefix}/{p.parent.name}/{p.name}" for p in clips])
        n = len(clips)
        before = server.object_gets("bench")
        first_s, first = timed(
            f"first ingest ({n} new objects)", lambda: ingest(engine, [prefix], workers=workers)
        )
        got_first = server.object_gets("bench") - before
        again_s, again = timed(
            f"second ingest, nothing changed ({n} objects)", lambda: ingest(engine, [prefix], workers=workers)
        )
        got_again = server.object_gets("bench") - before - got_first
        if first.new + first.duplicate != n or again.unchanged != n:  # duplicates: the folder's own bytes
            raise SystemExit(f"unexpected counts: first {first.to_dict()}, second {again.to_dict()}")
        met = "met" if again_s * 2000 / n < 2 and got_again == 0 else "NOT met"
        print(f"\n  {'':<22} {'first ingest':>14} {'unchanged':>11} {'objects downloaded':>20}")
        print(f"  {'local folder':<22} {folder_first:12.2f} s {folder_again:9.2f} s {'-':>20}")
        downloads = f"{got_first}, then {got_again}"
        print(f"  {'bucket (local S3)':<22} {first_s:12.2f} s {again_s:9.2f} s {downloads:>20}")
        print(f"  unchanged re-run of {n} objects: target < 2 s per 2,000 and none downloaded: {met}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
