"""Text from Capillary made storable: only what PostgreSQL refuses is escaped."""

from __future__ import annotations

from worker.domain.text import storable, storable_json


def test_only_nul_and_lone_surrogates_are_escaped() -> None:
    assert storable("Gold tier\n€ 😀") == "Gold tier\n€ 😀"
    assert storable("a\x00b\ud800c\udfff") == "a\\x00b\\ud800c\\udfff"


def test_every_string_and_key_of_an_answer_is_made_storable() -> None:
    answer = {"response": [{"result": {"description": "x\x00", "discountValue": 10,
                                       "d\ud801": ["ok", "\x00", None, 1.5]}}]}
    assert storable_json(answer) == {"response": [{"result": {
        "description": "x\\x00", "discountValue": 10,
        "d\\ud801": ["ok", "\\x00", None, 1.5]}}]}
