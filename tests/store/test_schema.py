"""qwen_tasks.store.schema against the migrated database: the SQL files are the truth, and a Python
declaration that drifts from them (a renamed column, a widened type, a view declared as a table) would
only show up as a wrong answer at run time, so it is caught here instead."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.store import schema

# sa.Float compiles to FLOAT, which PostgreSQL takes as double precision (and reflects as such).
SAME_TYPE = {"FLOAT": "DOUBLE PRECISION"}


def _sql_type(type_: sa.types.TypeEngine, dialect: sa.Dialect) -> str:
    """The PostgreSQL type name a column type stands for, so a declared and a reflected type compare."""
    name = type_.compile(dialect=dialect)
    return SAME_TYPE.get(name, name)


def _mismatches(engine: Engine, table: sa.Table) -> list[str]:
    """What is wrong with one declaration against the database (empty when it matches)."""
    inspector = sa.inspect(engine)
    views = set(inspector.get_view_names())
    tables = set(inspector.get_table_names())
    if table.name not in views | tables:
        return [f"{table.name}: declared, but no such table or view in SQL"]
    problems = []
    in_sql = "view" if table.name in views else "table"
    as_declared = "view" if schema.is_view(table) else "table"
    if in_sql != as_declared:
        problems.append(f"{table.name}: a {in_sql} in SQL, declared as a {as_declared}")
    actual = {c["name"]: c for c in inspector.get_columns(table.name)}
    declared = {c.name for c in table.columns}
    if declared - set(actual):
        problems.append(f"{table.name}: declared but missing in SQL: {declared - set(actual)}")
    if schema.is_view(table) and list(actual) != [c.name for c in table.columns]:
        problems.append(f"{table.name}: columns in SQL {list(actual)}, declared {list(table.c.keys())}")
    for column in table.columns:
        if column.name not in actual:
            continue
        want = _sql_type(column.type, engine.dialect)
        got = _sql_type(actual[column.name]["type"], engine.dialect)
        if want != got:
            problems.append(f"{table.name}.{column.name}: {got} in SQL, declared {want}")
        # PostgreSQL reports every view column as nullable; for tables NOT NULL must agree both ways
        if not schema.is_view(table) and column.nullable != actual[column.name]["nullable"]:
            problems.append(
                f"{table.name}.{column.name}: nullable {actual[column.name]['nullable']} in SQL, "
                f"declared {column.nullable}"
            )
    return problems


def test_python_table_mirrors_match_migrated_database(engine: Engine) -> None:
    inspector = sa.inspect(engine)
    for table in schema.metadata.sorted_tables:
        actual = {c["name"] for c in inspector.get_columns(table.name)}
        declared = {c.name for c in table.columns}
        assert declared <= actual, f"{table.name}: declared but missing in SQL: {declared - actual}"


@pytest.mark.parametrize("table", schema.metadata.sorted_tables, ids=lambda t: t.name)
def test_declaration_matches_migrated_database(engine: Engine, table: sa.Table) -> None:
    """Kind (table or view), column names, types and NOT NULL of every declared relation."""
    assert _mismatches(engine, table) == []


def test_every_view_is_declared_once(engine: Engine) -> None:
    """Queries use schema's view declarations, so each view of the migrations must have one."""
    declared = [t.name for t in schema.metadata.sorted_tables if schema.is_view(t)]
    assert sorted(declared) == sorted(t.name for t in schema.VIEWS)
    assert sorted(declared) == sorted(sa.inspect(engine).get_view_names())


def test_check_catches_a_wrong_declaration(engine: Engine) -> None:
    """The check itself can fail: a wrong type, a lost NOT NULL and a view declared as a table."""
    wrong = sa.MetaData()
    table = sa.Table(
        "label_run",
        wrong,
        sa.Column("id", sa.Integer, primary_key=True),  # bigint in SQL
        sa.Column("task", sa.Text),  # NOT NULL in SQL
        sa.Column("n_planned", sa.Text, nullable=False),  # integer in SQL
    )
    view = sa.Table("run_progress", wrong, sa.Column("run_id", sa.BigInteger))
    assert _mismatches(engine, table) == [
        "label_run.id: BIGINT in SQL, declared INTEGER",
        "label_run.task: nullable False in SQL, declared True",
        "label_run.n_planned: INTEGER in SQL, declared TEXT",
    ]
    assert _mismatches(engine, view) == ["run_progress: a view in SQL, declared as a table"]
