"""The one exception tree of villi.

Every error villi raises on purpose derives from :class:`VilliError`, so callers (the
CLI, the agent's API, the CNI plugin) can turn any of them into a clear message without
catching unrelated bugs. Subclasses carry the machine-readable detail their users need:
an errno for kernel errors, a CNI code for the plugin, a file/field path for policies.

    VilliError
    ├── DatapathError          kernel BPF work failed (errno set when the kernel gave one)
    │   ├── CompileError       clang rejected a program (stderr attached)
    │   ├── LoadError          libbpf/verifier rejected an object (verifier log attached)
    │   ├── AttachError        tc/cgroup attach or detach failed
    │   └── MapError           a map operation failed (ENOENT is not an error: lookups
    │                          return None)
    ├── NetnsError             namespace, link, address or route work failed
    ├── StoreError             the kvstore failed or is unreachable
    │   ├── StoreUnavailable   no backend answered within the retry bound
    │   ├── TxnConflict        a compare-and-swap lost the race
    │   └── SchemaError        a stored value has not the shape villi.kvstore.schema says
    ├── ResourceError          a YAML resource is invalid (file, document, field path)
    │   └── PolicyError        … and the resource is a policy
    ├── IdentityError          identity allocation/release failed
    ├── IPAMError              an address could not be allocated or released
    │   ├── PoolExhausted      no free address left (CNI code 11: try again later)
    │   └── AddressInUse       the address belongs to a live endpoint
    ├── CloudAPIError          the (simulated) cloud provider's API refused a call
    ├── EndpointError          endpoint lifecycle failed
    │   ├── EndpointNotFound   no such endpoint on this node
    │   └── BadRequest         a request to the agent is malformed (carries a CNI code)
    └── AgentUnavailable       the agent's API could not be reached in time
"""

from __future__ import annotations


class VilliError(Exception):
    """Base of every deliberate villi error."""


class DatapathError(VilliError):
    """Kernel BPF work failed; ``errno`` is the kernel's errno when it gave one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CompileError(DatapathError):
    """clang could not compile a BPF program; ``stderr`` holds its diagnostics."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(f"{message}\n{stderr}" if stderr else message)
        self.stderr = stderr


class LoadError(DatapathError):
    """libbpf or the verifier rejected an object; ``verifier_log`` holds the log."""

    def __init__(self, message: str, errno: int | None = None, verifier_log: str = "") -> None:
        text = message
        if verifier_log:
            text = f"{message}\n--- verifier log ---\n{verifier_log}"
        super().__init__(text, errno)
        self.verifier_log = verifier_log


class AttachError(DatapathError):
    """Attaching or detaching a program failed."""


class MapError(DatapathError):
    """A BPF map operation failed."""


class NetnsError(VilliError):
    """Namespace, link, address or route work failed."""


class StoreError(VilliError):
    """The kvstore failed."""


class StoreUnavailable(StoreError):
    """No kvstore backend answered within the retry bound."""


class TxnConflict(StoreError):
    """A compare-and-swap transaction lost the race."""


class SchemaError(StoreError):
    """A value in the store does not have the shape ``villi.kvstore.schema`` says."""


class ResourceError(VilliError):
    """A YAML resource is invalid.

    ``file``/``document``/``field`` locate the mistake so the message can say where:
    ``policy.yaml: document 2: spec.ingress[0].toPorts[0].ports[0].port: 70000 is out of range``.
    """

    def __init__(
        self,
        reason: str,
        file: str | None = None,
        document: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.document = document
        self.field = field
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file:
            where.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason


class PolicyError(ResourceError):
    """A policy resource is invalid."""


class IdentityError(VilliError):
    """Identity allocation or release failed."""


class IPAMError(VilliError):
    """An address could not be allocated or released."""


class PoolExhausted(IPAMError):
    """No free address is left in the node's pod CIDRs."""


class AddressInUse(IPAMError):
    """The address belongs to a live endpoint (delete the endpoint, not the address)."""


class CloudAPIError(VilliError):
    """A cloud API call failed; ``code`` is the provider's error code
    (``RequestLimitExceeded``, ``AttachmentLimitExceeded``…), ``action`` the call."""

    def __init__(self, action: str, code: str, message: str) -> None:
        super().__init__(f"{action}: {code}: {message}")
        self.action = action
        self.code = code


class EndpointError(VilliError):
    """Endpoint lifecycle work failed."""


class EndpointNotFound(EndpointError):
    """No endpoint by that reference on this node."""


class BadRequest(EndpointError):
    """A request to the agent is malformed; ``cni_code`` is what the CNI plugin should
    hand the runtime (4: invalid network config, 3: unknown container/netns)."""

    def __init__(self, message: str, cni_code: int = 0) -> None:
        super().__init__(message)
        self.cni_code = cni_code


class AgentUnavailable(VilliError):
    """The agent's API could not be reached in time."""
