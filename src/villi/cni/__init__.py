"""villi.cni: the ``villi-cni`` plugin (CNI spec 0.3.0-1.1.0), a thin client of the agent.

``villi.cni.main:main`` is the console script. Everything here imports only the standard
library's light modules (json, os, socket, re, time) and ``villi.errors``: the runtime
execs the plugin once per pod, so start-up time is latency every pod pays (docs/cni.md).

Public surface: :class:`CNIError` (a failure with its CNI code), the code constants,
and :data:`SUPPORTED_VERSIONS`.
"""

from villi.cni._config import SUPPORTED_VERSIONS
from villi.cni._errors import (
    AGENT_ERROR,
    CHECK_FAILED,
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL_ERROR,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    LIMITED_CONNECTIVITY,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    UNSUPPORTED_FIELD,
    CNIError,
)

__all__ = [
    "AGENT_ERROR",
    "CHECK_FAILED",
    "CNIError",
    "DECODE_FAILURE",
    "INCOMPATIBLE_VERSION",
    "INTERNAL_ERROR",
    "INVALID_CONFIG",
    "INVALID_ENV",
    "IO_FAILURE",
    "LIMITED_CONNECTIVITY",
    "NOT_AVAILABLE",
    "SUPPORTED_VERSIONS",
    "TRY_AGAIN_LATER",
    "UNKNOWN_CONTAINER",
    "UNSUPPORTED_FIELD",
]
