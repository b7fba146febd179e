"""The error tree, and the one table from errors to status codes (``status_for``)."""

from __future__ import annotations

import grpc
import pytest

from recsvc import errors
from recsvc.serving.service import status_for

# The expected code of every class in the error tree, written out here rather than read
# from the service's table: a class added without a decision here fails the test below.
_EXPECTED_STATUS = {
    errors.RecsvcError: grpc.StatusCode.INTERNAL,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.BundleError: grpc.StatusCode.INTERNAL,
    errors.BundleUnreadable: grpc.StatusCode.INTERNAL,
    errors.DataError: grpc.StatusCode.INTERNAL,
    errors.FitError: grpc.StatusCode.INTERNAL,
    errors.StateError: grpc.StatusCode.INTERNAL,
    errors.StateUnavailable: grpc.StatusCode.UNAVAILABLE,
}
# Internal failures say nothing about themselves to the client.
_GENERIC = {grpc.StatusCode.INTERNAL}


def _error_tree(root: type[errors.RecsvcError]) -> list[type[errors.RecsvcError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _error_tree(sub))]


def test_every_error_class_has_an_expected_status() -> None:
    assert set(_error_tree(errors.RecsvcError)) == set(_EXPECTED_STATUS)


def _instance(kind: type[BaseException]) -> BaseException:
    if kind is errors.InvalidArgument:
        return errors.InvalidArgument("k", "must be positive")
    return kind("some detail")


@pytest.mark.parametrize(
    "kind", [*_EXPECTED_STATUS, Exception, ValueError, KeyError], ids=lambda k: k.__name__
)
def test_status_for_every_error(kind: type[BaseException]) -> None:
    code, message = status_for(_instance(kind))
    expected = _EXPECTED_STATUS.get(kind, grpc.StatusCode.INTERNAL)  # type: ignore[call-overload]
    assert code == expected
    if expected in _GENERIC:
        assert message == "internal error"
    else:
        assert message == str(_instance(kind))
