"""Typer flags generated from an options dataclass (`qwen_tasks.options_spec`): one declaration per option.

`generated_flags(LabelOptions)` appends a typer option for every option with a flag (`Spec.cli`) to the
decorated command's signature (`__signature__`, which typer reads through `inspect.signature`), so
`qwen-tasks label`, `finetune` and `review push` take exactly the options their DAGs take, with the same
defaults and limits in `--help` (`work` and `calibrate`, which have no DAG form, are generated the same
way). Every generated flag defaults to None, "the option's default": the
command hands what was given to `options_from_flags`, and `from_mapping` fills in the rest and checks
all of it with the one set of rules (one line naming the flag). Options only a command has (`--json`,
`--plan-only`) stay declared in the command itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import typer

from qwen_tasks.options_spec import help_text, specs

F = TypeVar("F", bound=Callable[..., Any])

_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "enum": str,
                          "list": list[str], "enum_list": list[str]}  # fmt: skip


def flag_parameters(options: type, only: Collection[str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only parameter per option with a flag (of those named in `only`, if given):
    `typer.Option(None, <flag>, help=...)`."""
    out = []
    for name, spec in specs(options).items():
        if not spec.cli or (only is not None and name not in only):
            continue
        decl = spec.flag or "--" + name.replace("_", "-")
        annotation = str if spec.separator else _TYPES[spec.kind]
        info = typer.Option(
            ... if spec.required else None, decl, help=help_text(options, name), show_default=False
        )
        out.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
        )
    return out


def generated_flags(options: type, only: Collection[str] | None = None) -> Callable[[F], F]:
    """Decorator (below `@app.command`): the command's own parameters, then the options' flags (those in
    `only`, if given), which reach the command in its `**flags`. Stackable: a command may take the flags
    of two options classes (`label`: LabelOptions', and WorkerOptions' `--lease-seconds`)."""

    def wrap(command: F) -> F:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [p for p in flag_parameters(options, only) if p.name not in taken]
        command.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return command

    return wrap


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags given on the command line (None, or an empty repeatable flag: not given)."""
    return {k: v for k, v in flags.items() if v is not None and v != [] and v != ()}
