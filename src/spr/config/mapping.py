"""Where events land in PostgreSQL: the table mapping and its presets (design §5)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spr._event import COLUMN_TYPES, STATE_COLUMNS
from spr.errors import ConfigError

__all__ = [
    "DEFAULT_MAPPING",
    "MAX_NAME_BYTES",
    "ORDERS_MAPPING",
    "TableMapping",
    "TableName",
    "parse_table_name",
]

#: PostgreSQL's longest identifier (``NAMEDATALEN - 1``), in bytes of its UTF-8 form. A
#: longer name is silently cut by the server, so spr refuses it instead.
MAX_NAME_BYTES = 63

_NAME_FORM = "write TABLE or SCHEMA.TABLE"


@dataclass(frozen=True)
class TableName:
    """A table as spr addresses it: the table's own name and, optionally, its schema.

    ``schema`` None means "wherever PostgreSQL's ``search_path`` finds it" (normally
    ``public``). ``str()`` gives the dotted form users write (``myschema.t``); the sink
    quotes each part separately (:func:`spr.sink.schema.identifier`), never the string.
    """

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


def _check_part(part: str, text: str, what: str) -> None:
    if not part:
        raise ConfigError(f"{what} name {text!r} has an empty part; {_NAME_FORM}")
    if "\0" in part:
        raise ConfigError(f"{what} name {text!r} contains a NUL character; {_NAME_FORM}")
    size = len(part.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        which = f" ({size} bytes)" if part == text else f": its part {part!r} has {size} bytes"
        raise ConfigError(
            f"{what} name {text!r} is too long{which}, and PostgreSQL would cut it to "
            f"{MAX_NAME_BYTES}; choose a shorter name"
        )


def parse_table_name(text: str, *, what: str = "table") -> TableName:
    """The one parser of table names: ``TABLE`` or ``SCHEMA.TABLE`` (design §5).

    Each part is taken literally (spr quotes it, so case and any character but ``.`` and
    NUL are kept). Raises :class:`ConfigError` with one sentence for an empty name or
    part, more than one dot, a NUL character, or a part longer than PostgreSQL's 63
    bytes (UTF-8). ``what`` names the setting in that sentence. Pure; never blocks.
    """
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what} name must not be empty; {_NAME_FORM}")
    parts = text.split(".")
    if len(parts) > 2:
        raise ConfigError(f"{what} name {text!r} has more than one dot; {_NAME_FORM}")
    for part in parts:
        _check_part(part, text, what)
    if len(parts) == 2:
        return TableName(parts[0], parts[1])
    return TableName(None, text)


_DEFAULT_COLUMNS: tuple[tuple[str, str], ...] = tuple((c, c) for c in STATE_COLUMNS)


@dataclass(frozen=True, kw_only=True)
class TableMapping:
    """Where and how events land in PostgreSQL.

    ``columns`` pairs each target column with the canonical field that fills it (one of
    :data:`spr.batch.STATE_COLUMNS`). ``key`` names the target columns of the table's
    primary key or unique constraint (the ``ON CONFLICT`` target). ``sequence_column``
    is the target column of the sequence guard: a row is only ever replaced by an event
    with a strictly higher sequence, which is what makes replays, republished duplicates
    and a stale owner's late batch harmless. A mapping therefore must carry a sequence
    column; ``spr db init`` adds one to an existing user table that lacks it (rows that
    predate spr have NULL there and are replaced by the first event). ``now_columns``
    are set to ``now()`` on every insert and update (``processed_at``).

    When ``key`` does not hold the entity's whole identity (``entity_type`` and
    ``entity_id``), the sink collapses each key to its newest sequence in SQL as well,
    because two entity types may then share a key within one batch.

    Names (design §5): ``table`` may be given as ``SCHEMA.TABLE``; it is parsed once,
    here (:func:`parse_table_name`), into ``schema`` and ``table``. The offsets table and
    its gaps table (``<offsets_table>_gaps``) live in the state table's schema, unless
    ``offsets_table`` is itself given as ``SCHEMA.TABLE`` (then ``offsets_schema``). An
    unqualified name without ``schema`` is found through PostgreSQL's ``search_path``.
    """

    table: str = "spr_entity_state"
    schema: str | None = None
    columns: tuple[tuple[str, str], ...] = _DEFAULT_COLUMNS
    key: tuple[str, ...] = ("entity_type", "entity_id")
    sequence_column: str = "sequence"
    now_columns: tuple[str, ...] = ("processed_at",)
    offsets_table: str = "spr_offsets"
    offsets_schema: str | None = None

    def __post_init__(self) -> None:
        self._split_names()
        if self.state_name == self.offsets_name:
            raise ConfigError("the state table and the offsets table must differ")
        if self.state_name == self.gaps_name:
            raise ConfigError(
                f"the state table {self.state_name} is the offsets table's gaps table; "
                "choose another name for one of them"
            )
        targets = [target for target, _ in self.columns]
        if len(set(targets)) != len(targets):
            raise ConfigError(f"table {self.table}: a target column is mapped twice")
        sources = dict(self.columns)
        for target, source in self.columns:
            if not target:
                raise ConfigError(f"table {self.table}: empty column name")
            if source not in COLUMN_TYPES:
                raise ConfigError(
                    f"table {self.table}: column {target} maps from unknown field "
                    f"{source!r}; fields are {', '.join(STATE_COLUMNS)}"
                )
        if not self.key:
            raise ConfigError(f"table {self.table}: the key must name at least one column")
        for column in self.key:
            if column not in sources:
                raise ConfigError(f"table {self.table}: key column {column} is not mapped")
        if sources.get(self.sequence_column) != "sequence":
            raise ConfigError(
                f"table {self.table}: the sequence guard needs column "
                f"{self.sequence_column} mapped from field 'sequence'"
            )
        for column in self.now_columns:
            if column in sources:
                raise ConfigError(
                    f"table {self.table}: column {column} is both mapped and set to now()"
                )
        if "entity_id" not in {sources[c] for c in self.key}:
            raise ConfigError(f"table {self.table}: the key must include the entity_id field")

    def _split_names(self) -> None:
        # Frozen, so the parsed parts are stored with object.__setattr__; parsing an
        # already split name again is a no-op, which keeps dataclasses.replace() working.
        for name_field, schema_field, what in (
            ("table", "schema", "table"),
            ("offsets_table", "offsets_schema", "offsets table"),
        ):
            given = getattr(self, name_field)
            parsed = parse_table_name(given, what=what)
            schema = getattr(self, schema_field) or None
            if schema is not None:
                _check_part(schema, schema, f"{what} schema")
                if "." in schema:
                    raise ConfigError(f"{what} schema name {schema!r} must not contain a dot")
                if parsed.schema is not None and parsed.schema != schema:
                    raise ConfigError(
                        f"{what} {given} names schema {parsed.schema}, but the schema is "
                        f"set to {schema}; give the schema once"
                    )
            object.__setattr__(self, name_field, parsed.name)
            object.__setattr__(self, schema_field, parsed.schema or schema)
        gaps = f"{self.offsets_table}_gaps"
        size = len(gaps.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise ConfigError(
                f"offsets table name {self.offsets_table!r} is too long for its gaps table "
                f"{gaps!r} ({size} bytes; PostgreSQL allows {MAX_NAME_BYTES}); choose a "
                "shorter name"
            )

    @property
    def state_name(self) -> TableName:
        """The state table, with its schema when one was given."""
        return TableName(self.schema, self.table)

    @property
    def offsets_name(self) -> TableName:
        """The offsets table: in its own schema when qualified, else the state table's."""
        return TableName(self.offsets_schema or self.schema, self.offsets_table)

    @property
    def gaps_name(self) -> TableName:
        """The retention gaps table, beside the offsets table."""
        return TableName(self.offsets_name.schema, self.gaps_table)

    @property
    def gaps_table(self) -> str:
        """Where skipped retention gaps are recorded: ``<offsets_table>_gaps`` (the bare
        name; :attr:`gaps_name` has its schema)."""
        return f"{self.offsets_table}_gaps"

    @property
    def key_is_entity(self) -> bool:
        """True when the key holds both entity_type and entity_id (no SQL collapse needed)."""
        key_sources = {dict(self.columns)[c] for c in self.key}
        return {"entity_type", "entity_id"} <= key_sources

    def column_type(self, target: str) -> str:
        """PostgreSQL type of a mapped target column (the type of its source field)."""
        return COLUMN_TYPES[dict(self.columns)[target]]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TableMapping:
        """Build from a TOML ``[table]`` section; ``preset = "orders"`` starts from a preset.

        ``columns`` is a table of ``target = "field"`` pairs; ``name`` sets the table
        (``TABLE`` or ``SCHEMA.TABLE``); ``offsets_table`` may be qualified the same way.
        """
        data = dict(data)
        base = DEFAULT_MAPPING
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in _PRESETS:
                raise ConfigError(f"unknown table preset {preset!r}; known: {', '.join(_PRESETS)}")
            base = _PRESETS[preset]
        changes: dict[str, Any] = {}
        if "name" in data:
            changes["table"] = data.pop("name")
        for name in ("table", "schema", "sequence_column", "offsets_table"):
            if name in data:
                changes[name] = data.pop(name)
        if "columns" in data:
            columns = data.pop("columns")
            if not isinstance(columns, Mapping):
                raise ConfigError('table columns must be a table of target = "field" pairs')
            changes["columns"] = tuple((str(k), str(v)) for k, v in columns.items())
        for name in ("key", "now_columns"):
            if name in data:
                value = data.pop(name)
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ConfigError(f"table {name} must be a list of column names")
                changes[name] = tuple(str(v) for v in value)
        if data:
            raise ConfigError(f"unknown key(s) in [table]: {', '.join(sorted(data))}")
        return replace(base, **changes)


DEFAULT_MAPPING = TableMapping()

#: The field report's table: ``orders(order_id, status, payload, processed_at)`` plus the
#: ``sequence`` column the guard needs (added by ``spr db init`` when missing).
ORDERS_MAPPING = TableMapping(
    table="orders",
    columns=(
        ("order_id", "entity_id"),
        ("status", "state"),
        ("payload", "payload"),
        ("sequence", "sequence"),
    ),
    key=("order_id",),
    sequence_column="sequence",
    now_columns=("processed_at",),
)

_PRESETS: dict[str, TableMapping] = {"default": DEFAULT_MAPPING, "orders": ORDERS_MAPPING}
