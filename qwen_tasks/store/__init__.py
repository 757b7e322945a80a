"""Stage 0, the store: the PostgreSQL engine (embedded or a server), migrations, and the table/view mirrors.

Owns every fact about the database's shape in Python: `database` (engine per URL, transactions, the
embedded server, `yoyo` migrations from `sql/migrations/`) and `schema` (SQLAlchemy Core mirrors of
the tables *and views*; each is declared once here and imported everywhere else). The SQL files are
the source of truth; `tests/store/test_schema.py` checks the mirrors against a migrated database.

May import: `qwen_tasks.config`, `qwen_tasks.errors`. Every other stage imports this one.
"""
