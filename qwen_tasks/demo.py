"""`make demo`: the whole pipeline on generated sample audio, with no configuration needed."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from . import db
from .samples import write_sample_set

console = Console()


def main() -> None:
    out = Path("demo-output").resolve()
    samples = write_sample_set(out / "audio")
    console.print(
        f"[bold]1/2[/] wrote {len(samples.clips)} sample clips and 2 manifests under {samples.root}"
    )
    engine = db.get_engine()
    applied = db.upgrade(engine)
    console.print(
        f"[bold]2/2[/] database {db.describe(engine.url)} ready ({len(applied)} migration(s) applied)"
    )


if __name__ == "__main__":
    main()
