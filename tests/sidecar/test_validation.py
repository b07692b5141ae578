"""pydantic's validation errors as one line in plain words: no "Value error, ..." prefix."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from perseus_sidecar.validation import clean_message, error_line, one_line


class Pair(BaseModel):
    low: int = Field(ge=0)
    high: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Pair:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


def error_of(**raw: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Pair.model_validate(raw)
    return info.value


def test_a_validators_message_loses_pydantics_prefix() -> None:
    exc = error_of(low=3, high=1)
    assert exc.errors()[0]["msg"] == "Value error, low must not exceed high"  # what leaked
    assert one_line(exc) == "low must not exceed high"
    assert one_line(exc, root="spec") == "spec: low must not exceed high"


def test_field_errors_name_the_field_and_count_the_rest() -> None:
    assert one_line(error_of(low=-1, high=-2), root="spec") == (
        "spec.low: Input should be greater than or equal to 0 (and 1 more)"
    )
    assert one_line(error_of(low=-1, high=2)) == "low: Input should be greater than or equal to 0"


def test_single_errors_and_messages() -> None:
    assert error_line({"loc": ("body", "pods"), "msg": "Value error, pods must differ"}) == (
        "body.pods: pods must differ"
    )
    assert error_line({"loc": (), "msg": "Assertion failed, x"}) == "x"
    assert clean_message("Input should be a valid integer") == "Input should be a valid integer"
