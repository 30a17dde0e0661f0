"""CNI error codes and :class:`CNIError`, the plugin's one error type.

Every failure of ``villi-cni`` leaves the process as a CNI error object on stdout::

    {"cniVersion": "1.1.0", "code": 11, "msg": "...", "details": "..."}

Codes 1-99 are the spec's well-known codes; 100 and up are villi's own.
"""

from __future__ import annotations

from villi.errors import VilliError

# Well-known codes (CNI spec 1.1.0, "Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# villi's own codes (100 and up are free for plugins).
AGENT_ERROR = 100
"""The agent answered, but refused or failed the request (its message is passed on)."""
CHECK_FAILED = 101
"""CHECK found the endpoint missing or different from ``prevResult``."""
INTERNAL_ERROR = 999
"""A bug in the plugin itself (libcni's plugins use 999 for the same)."""


class CNIError(VilliError):
    """A failure reported to the runtime as CNI error JSON with ``code``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
