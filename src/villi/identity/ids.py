"""The numeric security identity: one ``NewType`` every layer shares.

It lives with the identities (allocation, cache, reserved ids) rather than with the
policy engine that consumes it, so identity code never has to import policy code for
its own id type.
"""

from __future__ import annotations

from typing import NewType

IdentityID = NewType("IdentityID", int)

__all__ = ["IdentityID"]
