"""One declaration per option: a dataclass field's default plus a `Spec` (type, limits, help), and every
surface generated from it.

An options dataclass (`labelling.options.LabelOptions`, `finetune.options.FinetuneOptions`,
`review.sync.SyncOptions`, `labelling.worker.WorkerOptions`, `quality.calibration.CalibrateOptions`)
declares each option once, `name: type = option(default, Spec(...))`. From that one declaration come:
- the DAG's Params (`param_specs`: Airflow `Param(default, **schema)`, the JSON schema its trigger form
  renders and validates; the key is the field name, or `Spec.param`);
- the CLI's flags (`qwen_tasks.cli.flags.generated_flags`: a typer option per field with a flag, default
  None = "the option's default", help text with the default, the limits and the choices);
- the validation every path runs (`from_mapping`: the form validates, but the REST API, `--conf` and
  the CLI hand over anything; the same rules as the schema, one line naming the option);
- the environment defaults (`Spec.setting`: the `config.Settings` field, hence QWEN_TASKS_* variable,
  whose value is the option's default on this machine; `default_values`).
So the form, the CLI and the pipeline cannot disagree on a default or a rule (Hugging Face's
HfArgumentParser does the same from a dataclass field's default and metadata).

Shared module (beside records and config): every stage may import it; it imports only config, errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qwen_tasks.config import Settings, get_settings
from qwen_tasks.errors import ConfigError

KINDS = ("str", "int", "float", "bool", "enum", "list", "enum_list")


@dataclass(frozen=True)
class Spec:
    """One option's type, rules and help. kind: str | int | float | bool | enum | list | enum_list.

    `nullable`: None (and "") means the default. `pattern`, `max_length`, `minimum`/`maximum`,
    `exclusive_minimum` and `item_pattern` are JSON schema keywords, checked by `check` the same way
    (`pattern_hint`: what the pattern means, for the error). `check`: the rule another module owns
    (value -> value, raising ConfigError with its own words); it replaces the pattern and range checks,
    which stay in the schema for the form.

    Surfaces: `dag=False`: not a DAG Param; `param`: the Param key when it is not the field name.
    `cli=False`: no CLI flag; `flag`: the typer declaration when it is not `--<name-with-dashes>`
    (`--threshold`, `--promoted/--no-promoted`); `required`: the flag must be given (the form has a
    default); `separator`: the CLI takes a list as one string split on it.
    `setting`: the `config.Settings` field (and so the QWEN_TASKS_* variable) that gives the default.
    `default_text`: how help shows an empty default (what the option does when it is left out).
    `form_blank`: the form shows a nullable option empty (null = the default) although the default is not."""

    kind: str
    title: str
    description: str = ""
    choices: tuple[str, ...] | Iterable[Any] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    pattern: str | None = None
    pattern_hint: str | None = None
    max_length: int | None = None
    item_pattern: str | None = None
    check: Callable[[Any], Any] | None = None
    dag: bool = True
    param: str | None = None
    cli: bool = True
    flag: str | None = None
    required: bool = False
    separator: str | None = None
    setting: str | None = None
    default_text: str | None = None
    form_blank: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Spec kind must be one of {KINDS}, got {self.kind!r}")
        if self.choices is not None:  # an enum class or members: their values, in order
            object.__setattr__(self, "choices", tuple(str(getattr(c, "value", c)) for c in self.choices))

    @property
    def json_type(self) -> str:
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "enum": "string",
                "list": "array", "enum_list": "array"}[self.kind]  # fmt: skip

    def schema(self) -> dict[str, Any]:
        """JSON schema keywords for Airflow's `Param(default, **schema)`."""
        base = self.json_type
        out: dict[str, Any] = {"type": ["null", base] if self.nullable else base}
        if base in ("integer", "number"):
            out.update(form_number_schema(base, self.nullable))
        if self.kind == "str" and not self.nullable and self.pattern is None:
            out["minLength"] = 1
        if self.kind == "enum" and self.choices is not None:
            out["enum"] = [*([None] if self.nullable else []), *self.choices]
        if self.kind == "list":
            out["items"] = {"type": "string", **({"pattern": self.item_pattern} if self.item_pattern else
                                                 {"minLength": 1})}  # fmt: skip
        if self.kind == "enum_list" and self.choices is not None:
            out.update(items={"type": "string", "enum": list(self.choices)}, minItems=1, uniqueItems=True)
        for key, value in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("exclusiveMinimum", self.exclusive_minimum),
            ("exclusiveMaximum", self.exclusive_maximum),
            ("pattern", self.pattern),
            ("maxLength", self.max_length),
        ):
            if value is not None:
                out[key] = value
        return out

    def limits(self) -> str:
        """The range and the choices in words, for help texts ("Range: >= 1, <= 1024.")."""
        low = (f"> {_num(self.exclusive_minimum)}" if self.exclusive_minimum is not None
               else f">= {_num(self.minimum)}" if self.minimum is not None else None)  # fmt: skip
        high = (f"< {_num(self.exclusive_maximum)}" if self.exclusive_maximum is not None
                else f"<= {_num(self.maximum)}" if self.maximum is not None else None)  # fmt: skip
        out = []
        if low or high:
            out.append("Range: " + ", ".join(x for x in (low, high) if x) + ".")
        if self.choices:
            out.append("One of: " + ", ".join(self.choices) + ".")
        if self.max_length is not None:
            out.append(f"At most {self.max_length} characters.")
        return " ".join(out)


def option(default: Any, spec: Spec) -> Any:
    """A dataclass field declaring one option: its default (a tuple for lists) and its Spec."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def from_setting(spec: Spec) -> Any:
    """An option whose default is its `Spec.setting`'s (the value declared in `config.Settings`; the
    environment's value replaces it in `default_values`)."""
    assert spec.setting, "from_setting needs Spec.setting"
    return option(next(f for f in fields(Settings) if f.name == spec.setting).default, spec)


def specs(cls: type) -> dict[str, Spec]:
    """field name -> Spec of an options dataclass (fields without a Spec are not options)."""
    return {f.name: f.metadata["spec"] for f in fields(cls) if "spec" in f.metadata}


def default_values(cls: type, settings: Settings | None = None) -> dict[str, Any]:
    """field name -> default of every option, with this machine's environment applied (`Spec.setting`)."""
    env = {name: spec.setting for name, spec in specs(cls).items() if spec.setting}
    s = (settings or get_settings()) if env else None
    return {
        f.name: getattr(s, env[f.name]) if f.name in env else
        (f.default_factory() if callable(f.default_factory) else f.default)
        for f in fields(cls) if "spec" in f.metadata
    }  # fmt: skip


def declared_default(cls: type, name: str) -> Any:
    """The default as declared (not the environment's): the field's, else its Settings field's."""
    f = next(f for f in fields(cls) if f.name == name)
    spec: Spec = f.metadata["spec"]
    if spec.setting:
        return next(s for s in fields(Settings) if s.name == spec.setting).default
    return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, str) and (" " in value or not value):
        return repr(value)
    return str(value)


def default_text(cls: type, name: str) -> str:
    """The default in words, generated from the one declaration: "QWEN_TASKS_BATCH_SIZE, else 16", "2",
    or the spec's `default_text` for an empty default."""
    spec = specs(cls)[name]
    value = declared_default(cls, name)
    empty = value in ("", None, ()) or value == []
    if spec.setting:
        var = Settings.env_var(spec.setting)
        return var if empty else f"{var}, else {show(value)}"
    if spec.default_text is not None:
        return spec.default_text
    return "" if empty else show(value)


def help_text(cls: type, name: str) -> str:
    """What an option means, its default and its limits: the CLI's help and the form's description."""
    spec = specs(cls)[name]
    out = spec.description.rstrip()
    if out and not out.endswith((".", "?")):
        out += "."
    default = "" if spec.required else default_text(cls, name)
    if default:
        out += f" Default: {default}."
    return f"{out} {spec.limits()}".strip()


def param_key(name: str, spec: Spec) -> str:
    return spec.param or name


def flag_name(name: str, spec: Spec) -> str:
    """How errors name the option on the command line (the first of its flag's spellings)."""
    decl = spec.flag or "--" + name.replace("_", "-")
    return decl.split("/")[0] if "/--no-" not in decl else decl


def param_specs(cls: type, settings: Settings | None = None) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Param key -> (default, Param keyword arguments): what a DAG turns into `Param`s.

    A nullable option whose default is empty (or `form_blank`) gets None as its default, so the form does
    not mark it required (an empty string would be)."""
    base = default_values(cls, settings)
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    for name, spec in specs(cls).items():
        if not spec.dag:
            continue
        default = base[name]
        default = [str(v) for v in default] if isinstance(default, tuple) else default
        if spec.nullable and (spec.form_blank or default in ("", [])):
            default = None
        out[param_key(name, spec)] = (
            default,
            {**spec.schema(), "title": spec.title, "description": help_text(cls, name)},
        )
    return out


def from_mapping(
    cls: type,
    raw: Mapping[str, Any],
    settings: Settings | None = None,
    *,
    flags: bool = False,
    params: bool | None = None,
) -> dict[str, Any]:
    """Checked values of every option of `cls` from a mapping (unknown keys are ignored: Airflow adds its
    own) keyed by Param key (`params`; default: unless `flags`) or by field name (the CLI's). A missing
    key or None (for a nullable option, "" too) takes the default; ConfigError names the option (as its
    CLI flag with `flags`, else as the DAG param) and the rule. Returns field name -> value for `cls`."""
    base = default_values(cls, settings)
    by_param = not flags if params is None else params
    values: dict[str, Any] = {}
    for name, spec in specs(cls).items():
        key = param_key(name, spec) if by_param else name
        shown = flag_name(name, spec) if flags else f"param {key!r}"
        value = raw.get(key)
        if value is None or (spec.nullable and value == ""):
            if value is None and key in raw and not spec.nullable:
                raise bad(shown, "must not be empty", value)
            values[name] = base[name]
            continue
        values[name] = check(shown, spec, value)
    return values


def check_fields(options: Any, *, flags: bool = True) -> None:
    """Check and normalise every option of a constructed options dataclass by its Spec (an empty nullable
    option is left as it is: the default), for `__post_init__`: direct construction obeys the same rules."""
    for name, spec in specs(type(options)).items():
        value = getattr(options, name)
        if spec.nullable and value in (None, ""):
            continue
        shown = flag_name(name, spec) if flags else f"param {param_key(name, spec)!r}"
        object.__setattr__(options, name, check(shown, spec, value))


# --- checks (the same rules as Spec.schema) --------------------------------------------------------------


def bad(shown: str, why: str, value: Any) -> ConfigError:
    """One line; a long value is cut (a 10 MB form field must not become a 10 MB log line)."""
    got = repr(value)
    if len(got) > 80:
        got = got[:60] + "..." + (f" ({len(value)} characters)" if isinstance(value, str) else "")
    return ConfigError(f"{shown} {why} (got {got})")


def check(name: str, spec: Spec, value: Any) -> Any:
    """`value` checked against `spec` and normalised (tuples for lists, str for enums); `name` is how
    errors name the option."""
    kind = spec.kind
    if kind in ("list", "enum_list"):
        if isinstance(value, str):
            if spec.separator:
                value = [v for v in value.split(spec.separator) if v.strip()]
            else:
                value = [value] if value.strip() else []
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
            raise bad(name, "must be a list of non-empty strings", value)
        if kind == "enum_list":
            allowed = list(spec.choices or ())
            if not value or any(v not in allowed for v in value):
                raise bad(name, f"must be a non-empty list of {allowed}", value)
            return tuple(dict.fromkeys(value))
        value = tuple(v.strip() for v in value)
        if spec.check:
            return spec.check(value)
        if spec.item_pattern:
            wrong = [v for v in value if not re.fullmatch(spec.item_pattern.strip("^$"), v)]
            if wrong:
                raise bad(name, f"takes names matching {spec.item_pattern}", wrong[0])
        return value
    if kind == "enum":
        allowed = list(spec.choices or ())
        if spec.check:
            return spec.check(value)
        if value not in allowed:
            raise bad(name, f"must be one of {allowed}", value)
        return str(value)
    if kind == "str":
        if not isinstance(value, str) or (not spec.nullable and not value.strip()):
            raise bad(name, "must be a non-empty string" if not spec.nullable else "must be a string", value)
        value = value.strip()
        if spec.max_length is not None and len(value) > spec.max_length:
            raise bad(name, f"must be at most {spec.max_length} characters", value)
        if spec.check:
            return spec.check(value)
        if spec.pattern and not re.fullmatch(spec.pattern.strip("^$"), value):
            raise bad(name, spec.pattern_hint or f"must match {spec.pattern}", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(name, "must be true or false", value)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, "must be an integer" if kind == "int" else "must be a number", value)
    if kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
        raise bad(name, "must be an integer", value)
    number = int(value) if kind == "int" else float(value)
    if spec.check:
        return spec.check(number)
    if spec.minimum is not None and number < spec.minimum:
        raise bad(name, f"must be >= {_num(spec.minimum)}", value)
    if spec.exclusive_minimum is not None and number <= spec.exclusive_minimum:
        raise bad(name, f"must be > {_num(spec.exclusive_minimum)}", value)
    if spec.maximum is not None and number > spec.maximum:
        raise bad(name, f"must be <= {_num(spec.maximum)}", value)
    if spec.exclusive_maximum is not None and number >= spec.exclusive_maximum:
        raise bad(name, f"must be < {_num(spec.exclusive_maximum)}", value)
    return number


def form_number_schema(base: str, nullable: bool = False) -> dict[str, Any]:
    """The JSON schema type of a number Param such that Airflow's trigger form never changes what the
    user typed.

    Airflow 3's form renders `type: "integer"` / `"number"` as a number input that clamps the value to
    `minimum`/`maximum` when the field loses focus and drops keystrokes that are not digits: batch size -5
    or 0 became 1, threshold 2 became 1, "abc" left the old value (or an empty limit: everything), and
    the run started with the changed value. A Param with more than one (non-null) type is rendered as a
    plain text field instead: the form parses what is typed as JSON, refuses anything that is not a
    number under the field ("Value must be one of: integer, number"), and sends numbers unchanged, so an
    out-of-range value is refused by the server's validation with the param's name. `multipleOf: 1`
    keeps an integer Param integral (the second type, number, would allow 1.5)."""
    types = ["integer", "number"]
    out: dict[str, Any] = {"type": ["null", *types] if nullable else types}
    if base == "integer":
        out["multipleOf"] = 1
    return out


def _num(x: float | None) -> str:
    assert x is not None
    return str(int(x)) if float(x).is_integer() else str(x)
