"""The poison corpus through decoding, the key check and classification."""

from __future__ import annotations

import pytest

from spr.classify import ErrorClass
from spr.testing.poison import CORPUS, PoisonCase, evaluate, key_of

REQUIRED_KINDS = {
    "truncated_json",
    "json_array",
    "json_number",
    "missing_entity_id",
    "empty_state",
    "sequence_as_string",
    "negative_sequence",
    "nan_sequence",
    "infinity_sequence",
    "invalid_utf8",
    "utf8_bom",
    "five_mb_value",
    "deep_nesting_10000",
    "tombstone",
    "empty_value",
    "key_of_another_entity",
    "duplicate_keys_last_wins",
}


def test_the_corpus_has_every_required_kind() -> None:
    names = {case.name for case in CORPUS}
    assert names >= REQUIRED_KINDS
    assert len(names) == len(CORPUS) >= 15
    assert sum(case.expected is ErrorClass.INVALID for case in CORPUS) >= 15


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_each_case_gets_its_class_and_reason(case: PoisonCase) -> None:
    event, error_class, reason = evaluate(case)
    if case.expected is ErrorClass.INVALID:
        assert event is None
        assert error_class is ErrorClass.INVALID
        assert case.reason in reason
    else:
        # Valid for the decoder; DATA cases are rejected by PostgreSQL later
        # (tests/integration/test_poison_db.py).
        assert error_class is None and reason == ""
        assert event is not None
        assert event.payload == case.value
        assert case.key == key_of(event.entity_type, event.entity_id)


def test_duplicate_keys_the_last_one_wins() -> None:
    case = next(c for c in CORPUS if c.name == "duplicate_keys_last_wins")
    event, _, _ = evaluate(case)
    assert event is not None and event.state == "paid"
    smuggled = next(c for c in CORPUS if c.name == "duplicate_entity_id_changes_entity")
    _, error_class, reason = evaluate(smuggled)
    assert error_class is ErrorClass.INVALID and "order:poison-dup-b" in reason


def test_sizes_are_what_the_names_say() -> None:
    by_name = {case.name: case for case in CORPUS}
    big = by_name["five_mb_value"].value
    assert big is not None and 5 * 1024 * 1024 <= len(big) < 6 * 1024 * 1024
    deep = by_name["deep_nesting_10000"].value
    assert deep is not None and deep.count(b"[") == 10_000
    assert by_name["tombstone"].value is None
    assert by_name["missing_key"].key is None
