"""The original Qwen-Audio through `qwen-tasks label` of the main environment (delegated) and of its own
environment (direct), side by side on the same clips and the same tiny checkpoint.

    QWEN_AUDIO_CODE_DIR=/tmp/Qwen-Audio .venv/bin/python bench/qwen_audio_label.py
    .venv/bin/python bench/qwen_audio_label.py --model ./tiny-qwen-audio --rounds 3

(a) direct: `.venv-qwen-audio/bin/qwen-tasks label ...` (plan + load + label in one process);
(b) delegated: `.venv/bin/qwen-tasks label ...`: plans in the main environment, then runs
    `.venv-qwen-audio/bin/qwen-tasks work --run ID --json` and adds up its summary.
Each configuration labels every clip (`--relabel`), cry with `--method both` then ASR, alternating (a) and
(b) for `--rounds` rounds. Printed per run: wall time of the command, its model load and process seconds
(from its `--json`). What (b) adds to (a) is its own start-up and planning, then a second Python start-up
for the worker. Needs `.venv-qwen-audio` (`make install-qwen-audio`) and, without --model, a copy of
QwenLM/Qwen-Audio in QWEN_AUDIO_CODE_DIR (docs/models.md). Uses a throwaway labels database on the local
server (or --admin-url), dropped at the end.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from qwen_tasks.labelling import environments  # noqa: E402
from qwen_tasks.store import database as db  # noqa: E402

DURATIONS = [1.0, 1.7, 2.4, 3.1, 3.8, 4.5, 5.2, 33.0]  # test_qwen_audio.py's clips: 54.7 s, 9 windows
TASKS = {
    "cry": ["--task", "cry", "--method", "both", "--max-new-tokens", "8"],
    "asr": ["--task", "asr", "--max-new-tokens", "24"],
}


def label(cli: list[str], args: list[str], env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.run([*cli, "label", *args, "--relabel", "--json"], capture_output=True, text=True,
                          env=env, timeout=1800, check=False)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cli)} label failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["labelled"] != len(DURATIONS):
        raise SystemExit(f"labelled {out['labelled']} of {len(DURATIONS)}: {out}")
    return {"wall_s": wall, "load_s": out["model_load_seconds"], "process_s": out["process_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a tiny Qwen-Audio checkpoint (default: build one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
        or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres",
    )
    args = parser.parse_args()
    python = environments.interpreter()
    if not python.is_file():
        raise SystemExit(environments.how_to_create(python))
    direct = [str(python), "-m", "qwen_tasks"]
    delegated = [sys.executable, "-m", "qwen_tasks"]
    with (
        tempfile.TemporaryDirectory(prefix="qwen_bench_qa_") as tmp,
        db.scratch_database(args.admin_url, prefix="qwen_tasks_bench") as url,
    ):
        work = Path(tmp)
        env = {
            **os.environ,
            "QWEN_TASKS_DATABASE_URL": url,
            "HF_HOME": str(work / "hf"),
            "HF_HUB_OFFLINE": "1",
        }
        model = args.model
        if model is None:
            code = os.environ.get("QWEN_AUDIO_CODE_DIR")
            if not code:
                raise SystemExit("give --model, or QWEN_AUDIO_CODE_DIR (a copy of QwenLM/Qwen-Audio)")
            model = work / "tiny_qwen_audio"
            builder = ROOT / "tests" / "qwen_audio_tiny.py"
            subprocess.run([str(python), str(builder), "--code", code, str(model)], env=env, check=True,
                           capture_output=True)  # fmt: skip
        from labelling_helpers import write_clips

        from qwen_tasks.ingest.register import ingest

        write_clips(work / "clips", DURATIONS)
        ingest(db.get_engine(url), [work / "clips"])
        common = ["--model", str(model), "--device", "cpu", "--batch-size", str(args.batch_size)]
        label(direct, [*TASKS["cry"], *common], env)  # warm-up: the remote code into the modules cache
        rows = []
        for round_ in range(1, args.rounds + 1):
            for task, flags in TASKS.items():
                for name, cli in (("(a) direct", direct), ("(b) delegated", delegated)):
                    load = os.getloadavg()[0]
                    rows.append({"round": round_, "task": task, "config": name, "load_avg": load,
                                 **label(cli, [*flags, *common], env)})  # fmt: skip
    audio = f"{sum(DURATIONS):.1f} s of audio"
    print(f"{len(DURATIONS)} clips ({audio}), batch {args.batch_size}, tiny Qwen-Audio checkpoint, CPU fp32")
    header = ("round", "task", "configuration", "wall s", "load s", "process s", "loadavg")
    print("{:>5} {:>4} {:<14} {:>7} {:>7} {:>9} {:>7}".format(*header))
    for r in rows:
        print(f"{r['round']:>5} {r['task']:>4} {r['config']:<14} {r['wall_s']:>7.1f} {r['load_s']:>7.1f} "
              f"{r['process_s']:>9.1f} {r['load_avg']:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
