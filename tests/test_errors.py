"""The one table from refusals to HTTP statuses (scheduler/contract/errors.py), both ways."""

from __future__ import annotations

import pytest

from scheduler.contract import errors
from scheduler.store import AlreadyExists, NotFound

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


@pytest.mark.parametrize("kind, status", sorted(errors.STATUS.items(), key=lambda kv: kv[1]))
def test_each_kind_has_one_status_and_comes_back_from_it(kind: type[errors.ApiError], status: int) -> None:
    assert errors.status_of(kind("x")) == status
    back = errors.from_status(status, "why")
    assert type(back) is kind and str(back) == "why"


def test_statuses_are_distinct_and_unknown_ones_stay_generic() -> None:
    assert len(set(errors.STATUS.values())) == len(errors.STATUS)
    assert type(errors.from_status(418, "teapot")) is errors.ApiError


def test_store_errors_are_refusals_of_their_kind() -> None:
    assert errors.status_of(AlreadyExists("run r-1 exists")) == 409
    assert errors.status_of(NotFound("run r-1")) == 404
    assert isinstance(AlreadyExists("x"), ValueError) and isinstance(NotFound("x"), KeyError)


def test_a_refusal_reads_as_written_even_when_it_is_a_key_error() -> None:
    assert str(NotFound("run run-1 not found")) == "run run-1 not found"  # KeyError would say "'run run-1 ...'"
