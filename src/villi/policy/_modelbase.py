"""Building blocks shared by the resource models: the strict base model, object
metadata, label selectors, CIDRs and the error type that lets a cross-field check name
the exact sub-field it is about (pydantic would otherwise blame the whole object)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from villi.identity.labels import SOURCE_ANY
from villi.policy.selectors import OPERATORS, Selector, parse_selector_key


class FieldError(ValueError):
    """A validation error about a sub-field (``path``) of the object being validated."""

    def __init__(self, message: str, *path: str | int) -> None:
        super().__init__(message)
        self.path = path


class StrictModel(BaseModel):
    """Unknown fields and wrong types are errors; field names are the YAML camelCase."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


def rejecting(message: str) -> Any:
    """The validator behind :func:`unsupported` (for ``Annotated[Any, AfterValidator(…)]``
    aliases, which type checkers accept where a call would not be)."""

    def reject(value: Any) -> Any:
        if value is not None:
            raise ValueError(message)
        return value

    return reject


def unsupported(message: str) -> Any:
    """A field that is recognised (so it is not "unknown") but rejected when used."""
    return Annotated[Any, AfterValidator(rejecting(message))]


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def check_name(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(f"{value!r} is not a valid name (lowercase letters, digits, '-' "
                         "and '.', starting and ending with a letter or digit)")
    return value


def check_label_key(key: str) -> None:
    """Kubernetes label key syntax: ``[prefix/]name``."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"label key {key!r} has an invalid prefix")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise ValueError(f"{key!r} is not a valid label key")


def check_label_value(value: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ValueError(f"{value!r} is not a valid label value")


def check_port_name(name: str) -> None:
    """IANA service name: at most 15 lowercase letters, digits and '-', with a letter."""
    if (len(name) > 15 or not _IANA_SVC_NAME.match(name) or "--" in name
            or not any(c.isalpha() for c in name)):
        raise ValueError(f"{name!r} is neither a port number nor a valid port name "
                         "(at most 15 lowercase letters, digits and '-')")


class ObjectMeta(StrictModel):
    name: Annotated[str, AfterValidator(check_name)]
    namespace: Annotated[str, AfterValidator(check_name)] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Any = None
    managed_fields: Any = None
    finalizers: list[str] | None = None

    @model_validator(mode="after")
    def _labels(self) -> ObjectMeta:
        for key, value in (self.labels or {}).items():
            try:
                check_label_key(key)
                check_label_value(value)
            except ValueError as exc:
                raise FieldError(str(exc), "labels", key) from None
        return self


class SelectorRequirement(StrictModel):
    key: str
    operator: str
    values: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> SelectorRequirement:
        if self.operator not in OPERATORS:
            raise FieldError(f"unknown operator {self.operator!r} (valid: "
                             f"{', '.join(OPERATORS)})", "operator")
        if self.operator in ("In", "NotIn") and not self.values:
            raise FieldError(f"operator {self.operator} needs at least one value", "values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise FieldError(f"operator {self.operator} takes no values", "values")
        for i, value in enumerate(self.values or ()):
            try:
                check_label_value(value)
            except ValueError as exc:
                raise FieldError(str(exc), "values", i) from None
        return self


class LabelSelector(StrictModel):
    """Kubernetes ``LabelSelector``; keys are plain Kubernetes label keys."""

    match_labels: dict[str, str] | None = None
    match_expressions: list[SelectorRequirement] | None = None

    def _check_key(self, key: str) -> None:
        check_label_key(key)

    @model_validator(mode="after")
    def _keys(self) -> LabelSelector:
        for key, value in (self.match_labels or {}).items():
            try:
                self._check_key(key)
                check_label_value(value)
            except ValueError as exc:
                raise FieldError(str(exc), "matchLabels", key) from None
        for i, expr in enumerate(self.match_expressions or ()):
            try:
                self._check_key(expr.key)
            except ValueError as exc:
                raise FieldError(str(exc), "matchExpressions", i, "key") from None
        return self

    def to_selector(self, *, default_source: str = SOURCE_ANY, key_prefix: str = "") -> Selector:
        exprs = [(e.key, e.operator, e.values or ()) for e in self.match_expressions or ()]
        return Selector.from_k8s(self.match_labels, exprs, default_source=default_source,
                                 key_prefix=key_prefix)


class EndpointSelector(LabelSelector):
    """Cilium's selector: keys may carry a source (``k8s:app``, ``reserved:host``)."""

    def _check_key(self, key: str) -> None:
        _source, name = parse_selector_key(key)
        check_label_key(name)


def _check_cidr(value: str) -> str:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid CIDR") from None
    if "/" in value and str(network) != _canonical_input(value):
        raise ValueError(f"{value} has host bits set (did you mean {network}?)")
    return str(network)


def _canonical_input(value: str) -> str:
    address, _, length = value.partition("/")
    return f"{ipaddress.ip_address(address)}/{int(length)}"


CIDR = Annotated[str, AfterValidator(_check_cidr)]


def check_except(cidr: str | None, excepts: list[str] | None, field: str) -> None:
    """Every ``except`` prefix must lie inside its ``cidr``."""
    if cidr is None:
        return
    outer = ipaddress.ip_network(cidr)
    for i, text in enumerate(excepts or ()):
        inner = ipaddress.ip_network(text)
        if inner.version != outer.version or not inner.subnet_of(outer):  # type: ignore[arg-type]
            raise FieldError(f"{text} is not inside {cidr}", field, i)
