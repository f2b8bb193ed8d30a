"""Where events land in PostgreSQL: the table mapping and its presets (design §5)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spr._event import COLUMN_TYPES, STATE_COLUMNS
from spr.errors import ConfigError

__all__ = ["DEFAULT_MAPPING", "ORDERS_MAPPING", "TableMapping"]


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
    """

    table: str = "spr_entity_state"
    schema: str | None = None
    columns: tuple[tuple[str, str], ...] = _DEFAULT_COLUMNS
    key: tuple[str, ...] = ("entity_type", "entity_id")
    sequence_column: str = "sequence"
    now_columns: tuple[str, ...] = ("processed_at",)
    offsets_table: str = "spr_offsets"

    def __post_init__(self) -> None:
        if not self.table or not self.offsets_table:
            raise ConfigError("table names must not be empty")
        if self.table == self.offsets_table:
            raise ConfigError("the state table and the offsets table must differ")
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

    @property
    def gaps_table(self) -> str:
        """Where skipped retention gaps are recorded: ``<offsets_table>_gaps``."""
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

        ``columns`` is a table of ``target = "field"`` pairs; ``name`` sets the table.
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
