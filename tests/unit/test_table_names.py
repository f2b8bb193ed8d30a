"""Table names (design §5): ``TABLE`` or ``SCHEMA.TABLE``, parsed in one place, and the
rule that tells a schema problem from bad data when every row of a batch is rejected."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import psycopg
import pytest

from spr.classify import ErrorClass, classify
from spr.config import DEFAULT_MAPPING, ORDERS_MAPPING, TableMapping, load_table_config
from spr.config.mapping import MAX_NAME_BYTES, TableName, parse_table_name
from spr.errors import ConfigError, SchemaMismatch
from spr.ops.replay import derived_group
from spr.sink.isolate import Isolation, failure_reason, shared_failure
from spr.sink.schema import TableSchema, identifier


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t", TableName(None, "t")),
        ("myschema.t", TableName("myschema", "t")),
        ("My Schema.Ünïcode Täble", TableName("My Schema", "Ünïcode Täble")),
        ('odd"quote.x', TableName('odd"quote', "x")),
        ("a" * MAX_NAME_BYTES, TableName(None, "a" * MAX_NAME_BYTES)),
        ("é" * 31 + "a", TableName(None, "é" * 31 + "a")),  # 63 bytes exactly
    ],
)
def test_names_parse_into_schema_and_table(text: str, expected: TableName) -> None:
    assert parse_table_name(text) == expected
    assert str(parse_table_name(text)) == text


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("", "table name must not be empty; write TABLE or SCHEMA.TABLE"),
        ("a.b.c", "table name 'a.b.c' has more than one dot; write TABLE or SCHEMA.TABLE"),
        ("db.s.t", "table name 'db.s.t' has more than one dot; write TABLE or SCHEMA.TABLE"),
        (".t", "table name '.t' has an empty part; write TABLE or SCHEMA.TABLE"),
        ("s.", "table name 's.' has an empty part; write TABLE or SCHEMA.TABLE"),
        (".", "table name '.' has an empty part; write TABLE or SCHEMA.TABLE"),
        ("t\0x", "table name 't\\x00x' contains a NUL character; write TABLE or SCHEMA.TABLE"),
        (
            "a" * 64,
            f"table name {'a' * 64!r} is too long (64 bytes), and PostgreSQL would cut it to "
            "63; choose a shorter name",
        ),
        (
            "s." + "é" * 32,  # 32 characters, 64 bytes: bytes count, not characters
            f"table name {'s.' + 'é' * 32!r} is too long: its part {'é' * 32!r} has 64 "
            "bytes, and PostgreSQL would cut it to 63; choose a shorter name",
        ),
    ],
)
def test_bad_names_are_one_sentence(text: str, sentence: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_table_name(text)
    assert str(caught.value) == sentence
    assert "\n" not in str(caught.value)


def test_the_mapping_splits_a_qualified_table_and_puts_offsets_beside_it() -> None:
    mapping = TableMapping(table="myschema.t")
    assert (mapping.schema, mapping.table) == ("myschema", "t")
    assert mapping.state_name == TableName("myschema", "t")
    assert mapping.offsets_name == TableName("myschema", "spr_offsets")
    assert mapping.gaps_name == TableName("myschema", "spr_offsets_gaps")
    assert mapping.gaps_table == "spr_offsets_gaps"
    # Splitting again is a no-op: replace() keeps working on a parsed mapping.
    assert replace(mapping, offsets_table="o").offsets_name == TableName("myschema", "o")
    assert replace(mapping, table="u").state_name == TableName("myschema", "u")


def test_a_qualified_offsets_table_lives_in_its_own_schema() -> None:
    mapping = TableMapping(table="app.t", offsets_table="ops.offsets")
    assert mapping.state_name == TableName("app", "t")
    assert mapping.offsets_name == TableName("ops", "offsets")
    assert mapping.gaps_name == TableName("ops", "offsets_gaps")
    unqualified = TableMapping(table="t", offsets_table="ops.offsets")
    assert unqualified.state_name == TableName(None, "t")
    assert unqualified.offsets_name == TableName("ops", "offsets")


def test_unqualified_names_stay_on_the_search_path() -> None:
    assert DEFAULT_MAPPING.state_name == TableName(None, "spr_entity_state")
    assert DEFAULT_MAPPING.offsets_name == TableName(None, "spr_offsets")
    assert TableMapping(table="t", schema="s").offsets_name == TableName("s", "spr_offsets")


@pytest.mark.parametrize(
    ("build", "sentence"),
    [
        (
            lambda: TableMapping(table="a.t", schema="b"),
            "table a.t names schema a, but the schema is set to b; give the schema once",
        ),
        (
            lambda: TableMapping(table="s.t", offsets_table="s.t"),
            "the state table and the offsets table must differ",
        ),
        (
            lambda: TableMapping(table="s.t", offsets_table="t"),
            "the state table and the offsets table must differ",
        ),
        (
            lambda: TableMapping(table="s.o_gaps", offsets_table="o"),
            "the state table s.o_gaps is the offsets table's gaps table; choose another name "
            "for one of them",
        ),
        (
            lambda: TableMapping(offsets_table="o" * 60),
            f"offsets table name {'o' * 60!r} is too long for its gaps table "
            f"{'o' * 60 + '_gaps'!r} (65 bytes; PostgreSQL allows 63); choose a shorter name",
        ),
        (
            lambda: TableMapping(offsets_table="x.y.z"),
            "offsets table name 'x.y.z' has more than one dot; write TABLE or SCHEMA.TABLE",
        ),
        (
            lambda: TableMapping(schema="a.b"),
            "table schema name 'a.b' must not contain a dot",
        ),
    ],
)
def test_mapping_names_are_checked_when_built(build: object, sentence: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build()  # type: ignore[operator]
    assert str(caught.value) == sentence


def test_every_way_in_goes_through_the_one_parser() -> None:
    from_toml = TableMapping.from_mapping({"preset": "orders", "name": "shop.orders"})
    assert from_toml.state_name == TableName("shop", "orders")
    assert from_toml.key == ORDERS_MAPPING.key
    _, from_env, _ = load_table_config(environ={"SPR_TABLE": "s.t"})
    assert from_env.state_name == TableName("s", "t")
    _, from_flag, _ = load_table_config(environ={}, flags={"table": "flag.t"})
    assert from_flag.offsets_name == TableName("flag", "spr_offsets")
    with pytest.raises(ConfigError, match="has more than one dot"):
        load_table_config(environ={}, flags={"table": "a.b.c"})


def test_identifiers_quote_each_part() -> None:
    schema = TableSchema(TableMapping(table='my"schema.T'))
    assert schema.table == identifier(TableName('my"schema', "T"))
    assert schema.offsets == identifier(TableName('my"schema', "spr_offsets"))
    assert schema.gaps == identifier(TableName('my"schema', "spr_offsets_gaps"))
    assert derived_group("g", str(TableName("s", "t"))) == "g.replay.s.t"


# ------------------------------------------------------------ every row, one reason


class _Rejection(Exception):
    """A stand-in for a server error: psycopg fills ``diag`` from the server's report."""

    def __init__(self, sqlstate: str, diag: SimpleNamespace) -> None:
        super().__init__(f"rejected ({sqlstate})")
        self.sqlstate = sqlstate
        self.diag = diag


def _rejection(
    sqlstate: str, *, column: str | None = None, constraint: str | None = None
) -> BaseException:
    assert psycopg.errors.lookup(sqlstate)  # a real SQLSTATE
    diag = SimpleNamespace(
        schema_name="public", table_name="u", column_name=column, constraint_name=constraint
    )
    return _Rejection(sqlstate, diag)


def _isolation(errors: list[BaseException]) -> Isolation[int]:
    return Isolation(rejected=list(enumerate(errors)), applied=0, calls=2 * len(errors) - 1)


def test_a_shared_failure_needs_every_row_one_reason_and_a_named_column() -> None:
    email = [_rejection("23502", column="email") for _ in range(5)]
    assert shared_failure(_isolation(email), 5) is email[0]
    # One row is the whole batch: it counts.
    assert shared_failure(_isolation(email[:1]), 1) is email[0]
    # Not every row failed: some data was fine, so it is data.
    assert shared_failure(_isolation(email[:4]), 5) is None
    # Two reasons (another column, another code, another constraint): data.
    mixed = [*email[:4], _rejection("23502", column="name")]
    assert shared_failure(_isolation(mixed), 5) is None
    checks = [_rejection("23514", constraint="c1") for _ in range(3)]
    assert shared_failure(_isolation(checks), 3) is checks[0]
    assert (
        shared_failure(_isolation([*checks[:2], _rejection("23514", constraint="c2")]), 3) is None
    )
    # PostgreSQL named neither a column nor a constraint (22xxx, a trigger's raise).
    unnamed = [_rejection("22P02") for _ in range(3)]
    assert shared_failure(_isolation(unnamed), 3) is None
    assert shared_failure(_isolation([]), 0) is None
    assert failure_reason(ValueError("no sqlstate")) is None


def test_a_schema_mismatch_is_fatal_and_one_sentence() -> None:
    error = SchemaMismatch("table users rejects every row")
    assert classify(error) is ErrorClass.FATAL
    assert isinstance(error, ConfigError)
