"""What can go wrong talking to MLflow, told apart so that no decision is made on a guess:
"does not exist" is an answer (handled where it is asked); "could not ask" is a `TrackingError`,
retryable when MLflow is down or failing, not when it refuses us."""

from __future__ import annotations

import functools

from nmm import exitcodes

_DENIED = ("PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED")


class TrackingError(RuntimeError):
    """MLflow could not answer. `exit_code`: 130 (retryable) for an outage, 4 for a refusal."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable
        self.exit_code = exitcodes.TRACKING_UNAVAILABLE if retryable else exitcodes.TRACKING_DENIED


class RegistryConflict(RuntimeError):
    """The registry holds a version for this run that was made from another model."""


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def not_found(exc: BaseException) -> bool:
    return error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def already_exists(exc: BaseException) -> bool:
    """Created meanwhile by a concurrent run: not an error for find-or-create."""
    return error_code(exc) == "RESOURCE_ALREADY_EXISTS"


def as_tracking_error(exc: BaseException, doing: str) -> TrackingError:
    code = error_code(exc) or type(exc).__name__
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return TrackingError(f"MLflow: cannot {doing} ({code}: {first})", retryable=code not in _DENIED)


def tracked(doing: str):
    """Turn any failure of MLflow (or of reaching it) inside the call into a TrackingError."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException
            from requests import RequestException

            try:
                return fn(*args, **kwargs)
            except (MlflowException, RequestException, ConnectionError, TimeoutError) as exc:
                raise as_tracking_error(exc, doing) from exc

        return call

    return wrap
