"""The package layout is the pipeline: each stage imports only the stages before it (data flows one way).

Parsed from the source (every `import`, including those inside functions), so a new back-edge, e.g.
labelling importing quality or orchestration, fails here with the module and the line that adds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qwen_tasks

PACKAGE = Path(qwen_tasks.__file__).parent
SHARED = ("config", "errors", "records", "progress")
STAGES = ("store", "ingest", "labelling", "quality", "review", "finetune", "orchestration", "cli")
# Outside the pipeline order: development aids may use any stage; the old import path of the normaliser
# re-exports it; the CLI's make-tiny-model and demo commands use the dev package.
ANY = {"dev", "normalize", "__main__", "__init__"}
CLI_MAY_ALSO = {"dev"}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen_tasks"):
            targets = (
                [node.module] if node.module != "qwen_tasks" else [f"qwen_tasks.{a.name}" for a in node.names]
            )
            found += [(node.lineno, t) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("qwen_tasks.")]
    return found


def test_every_stage_imports_only_earlier_stages() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        if own in ANY:
            continue
        for line, target in _imports(path):
            other = _stage(target)
            if other in SHARED or other == own or other == "":
                continue
            if own in SHARED:
                allowed = other in SHARED
            else:
                allowed = other in STAGES[: STAGES.index(own)] or (own == "cli" and other in CLI_MAY_ALSO)
            if not allowed:
                wrong.append(f"qwen_tasks/{rel}:{line} ({own}) imports {target}")
    assert not wrong, "imports against the pipeline's direction:\n" + "\n".join(wrong)


def test_every_stage_package_says_what_it_owns_and_may_import() -> None:
    for stage in (*STAGES, "dev"):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 200, f"qwen_tasks/{stage}/__init__.py needs a docstring saying what it owns"
        if stage not in ("cli", "dev"):
            assert "May import" in doc, f"qwen_tasks/{stage}/__init__.py does not say what it may import"


def test_the_old_normaliser_import_path_still_works() -> None:
    from qwen_tasks.labelling.answers import normalize_yes_no as moved
    from qwen_tasks.normalize import normalize_yes_no

    assert normalize_yes_no is moved
    assert normalize_yes_no("Yes, a baby is crying.") == "yes"
    assert normalize_yes_no("不，没有婴儿在哭。") == "no"
