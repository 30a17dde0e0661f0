"""Reading resource YAML: multi-document files in, validated models out, or one error.

Validation is all-or-nothing: if any document of any file given in one call is bad,
the call raises and returns nothing, so ``villi apply -f`` never applies half a file.
The error names the file, the document (1-based), the field path
(``spec.ingress[0].toPorts[0].ports[0].port``), the line and the reason, because a
policy author's next step is to open the file at that line.

Valid fields that select nothing on villi (IPv6 CIDRs, some entities, ICMPv6 types)
are accepted and reported in the result's ``warnings`` (see ``unenforced``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from villi.errors import PolicyError, ResourceError
from villi.policy._modelbase import FieldError, StrictModel
from villi.policy.models import KINDS, Resource, resource_key
from villi.policy.unenforced import PolicyWarning, find

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_POLICY_KINDS = {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"}
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

Loc = tuple[str | int, ...]
#: (apiVersion, kind) → model: which kinds a load accepts. The default is the policy
#: engine's own (policies, Namespace); ``villi.resources.all_kinds()`` is the one
#: registry of every kind ``villi apply`` takes, passed in by its callers (the loader
#: sits below the packages that define Service and Pod, so it cannot import them).
Kinds = Mapping[tuple[str, str], type[StrictModel]]

MAX_DOCUMENT_BYTES = 1024 * 1024  # under etcd's default 1.5 MiB request limit
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_EXPANDED_NODES = 100_000  # a large policy has a few thousand nodes


def read_file(path: str | Path) -> str:
    """A resource file's text, refusing files over :data:`MAX_FILE_BYTES`."""
    name = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ResourceError(f"file is {size} bytes, more than the limit of "
                                f"{MAX_FILE_BYTES}", file=name)
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResourceError(f"cannot read file: {exc}", file=name) from exc


class Loaded(list[Resource]):
    """The resources of one load, in order, and the warnings about fields that are
    accepted but select nothing here (:class:`~villi.policy.unenforced.PolicyWarning`)."""

    def __init__(self, items: Iterable[Resource] = (),
                 warnings: Iterable[PolicyWarning] = ()) -> None:
        super().__init__(items)
        self.warnings = list(warnings)


def load_files(paths: Iterable[str | Path], kinds: Kinds | None = None) -> Loaded:
    """Every resource of every file, in order; raises on the first bad document."""
    return load_sources(((str(path), read_file(path)) for path in paths), kinds)


def load_sources(sources: Iterable[tuple[str, str]], kinds: Kinds | None = None) -> Loaded:
    """Like :func:`load_files` for (name, text) pairs already read (stdin, tests)."""
    resources = Loaded()
    seen: dict[tuple[str, str | None, str], str] = {}
    for name, text in sources:
        for doc, resource in _load(text, name, resources.warnings, kinds):
            key = resource_key(resource)
            where = f"{name} document {doc}"
            if key in seen:
                kind, ns, res_name = key
                cls = PolicyError if kind in _POLICY_KINDS else ResourceError
                full = f"{ns}/{res_name}" if ns else res_name
                raise cls(f"{kind} {full} is defined twice (also in {seen[key]})",
                          file=name, document=doc, field="metadata.name")
            seen[key] = where
            resources.append(resource)
    return resources


def load_file(path: str | Path, kinds: Kinds | None = None) -> Loaded:
    return load_files([path], kinds)


def load_text(text: str, filename: str = "<string>", kinds: Kinds | None = None) -> Loaded:
    """Like :func:`load_files` for YAML already in memory (tests, the API)."""
    resources = Loaded()
    seen: set[tuple[str, str | None, str]] = set()
    for doc, resource in _load(text, filename, resources.warnings, kinds):
        key = resource_key(resource)
        if key in seen:
            cls = PolicyError if key[0] in _POLICY_KINDS else ResourceError
            raise cls(f"{key[0]} {key[2]} is defined twice", file=filename, document=doc,
                      field="metadata.name")
        seen.add(key)
        resources.append(resource)
    return resources


def _load(text: str, filename: str, warnings: list[PolicyWarning] | None = None,
          kinds: Kinds | None = None) -> list[tuple[int, Resource]]:
    kinds = KINDS if kinds is None else kinds
    loaded: list[tuple[int, Resource]] = []
    for doc, node, data in _documents(text, filename):
        if data is None:
            continue
        loaded.append((doc, _validate(data, node, filename, doc, kinds)))
        if warnings is not None:
            warnings.extend(PolicyWarning(filename, doc, format_loc(loc), message,
                                          _line_of(node, loc)) for loc, message in find(data))
    return loaded


def _documents(text: str, filename: str) -> Iterator[tuple[int, yaml.Node, Any]]:
    loader = _Loader(text)
    doc = 0
    try:
        while True:
            doc += 1
            if not loader.check_node():
                break
            node = loader.get_node()
            if node is None:
                continue
            _check_size(node, filename, doc)
            _check_duplicate_keys(node, (), filename, doc, set())
            yield doc, node, loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise ResourceError(f"invalid YAML: {reason}", file=filename, document=doc,
                            line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ResourceError(f"invalid YAML: {exc}", file=filename, document=doc) from None
    finally:
        loader.dispose()


def _check_size(node: yaml.Node, filename: str, doc: int) -> None:
    """Refuse a document over :data:`MAX_DOCUMENT_BYTES` of text, or one whose aliases
    expand to more than :data:`MAX_EXPANDED_NODES` nodes (an "alias bomb": 725 bytes
    of nested ``*a`` references expand to billions of nodes). The expanded size is
    computed once per distinct node (linear in the file), never by expanding."""
    length = node.end_mark.index - node.start_mark.index
    if length > MAX_DOCUMENT_BYTES:
        raise ResourceError(f"document is {length} bytes, more than the limit of "
                            f"{MAX_DOCUMENT_BYTES} per document", file=filename, document=doc,
                            line=node.start_mark.line + 1)
    sizes: dict[int, int] = {}
    # Iterative post-order walk: a deep document must not hit Python's recursion limit.
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        ident = id(current)
        if ident in sizes and sizes[ident] >= 0:
            continue
        children = _children(current)
        if not children_done:
            if sizes.get(ident) == -1:
                raise ResourceError("a YAML alias refers to itself (recursive document)",
                                    file=filename, document=doc,
                                    line=current.start_mark.line + 1)
            sizes[ident] = -1  # in progress
            stack.append((current, True))
            stack.extend((child, False) for child in children if sizes.get(id(child), -2) < 0)
            continue
        total = 1 + sum(sizes[id(child)] for child in children)
        if total > MAX_EXPANDED_NODES:
            raise ResourceError(f"document expands to more than {MAX_EXPANDED_NODES} YAML "
                                "nodes through aliases (&anchor/*alias); refusing it",
                                file=filename, document=doc, line=current.start_mark.line + 1)
        sizes[ident] = total


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_duplicate_keys(node: yaml.Node, loc: Loc, filename: str, doc: int,
                          done: set[int]) -> None:
    """PyYAML keeps the last of two equal keys; in a policy that hides a mistake.
    Each distinct node is checked once (``done``): aliases share nodes, and walking
    them again would be exponential."""
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise ResourceError(f"duplicate key {key!r}", file=filename, document=doc,
                                    field=format_loc(loc + (key,)),
                                    line=key_node.start_mark.line + 1)
            seen.add(key)
            _check_duplicate_keys(value_node, loc + ((key,) if key is not None else ()),
                                  filename, doc, done)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, loc + (i,), filename, doc, done)


def _validate(data: Any, node: yaml.Node, filename: str, doc: int, kinds: Kinds) -> Resource:
    def fail(reason: str, loc: Loc, cls: type[ResourceError] = ResourceError) -> ResourceError:
        return cls(reason, file=filename, document=doc, field=format_loc(loc) or None,
                   line=_line_of(node, loc))

    if not isinstance(data, dict):
        raise fail(f"a resource must be a mapping, got {_describe(data)}", ())
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if api_version is None:
        raise fail("required field is missing", ("apiVersion",))
    if kind is None:
        raise fail("required field is missing", ("kind",))
    model = kinds.get((api_version, kind)) if isinstance(api_version, str) and isinstance(
        kind, str) else None
    if model is None:
        known = ", ".join(f"{k} ({v})" for v, k in kinds)
        raise fail(f"unknown kind {kind!r} for apiVersion {api_version!r} (supported: "
                   f"{known})", ("kind",))
    cls = PolicyError if kind in _POLICY_KINDS else ResourceError
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        errors = exc.errors()
        loc, reason = _explain(errors[0], kinds)
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        raise fail(reason, loc, cls) from None


def _explain(error: Any, kinds: Kinds) -> tuple[Loc, str]:
    """Turn one pydantic error into (field path, human reason)."""
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = _describe(error.get("input"))
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, FieldError):
            return loc + cause.path, str(cause)
        return loc, str(cause) if cause is not None else error["msg"]
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        hint = difflib.get_close_matches(name, _known_fields(kinds), n=1)
        return loc, f"unknown field {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    simple = {
        "string_type": "expected a string", "int_type": "expected an integer",
        "bool_type": "expected true or false", "list_type": "expected a list",
        "dict_type": "expected a mapping", "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping", "int_from_float": "expected an integer",
    }
    if kind in simple:
        return loc, f"{simple[kind]}, got {given}"
    if kind == "literal_error":
        return loc, f"expected {ctx.get('expected', '?')}, got {given}"
    if kind == "too_short":
        return loc, f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return loc, f"must have at most {ctx.get('max_length')} items"
    return loc, str(error["msg"])


_KNOWN: dict[tuple[tuple[str, str], ...], list[str]] = {}


def _known_fields(kinds: Kinds) -> list[str]:
    """Every YAML field name the models of ``kinds`` accept (for "did you mean")."""
    key = tuple(sorted(kinds))
    if key in _KNOWN:
        return _KNOWN[key]
    names: set[str] = set()
    todo: list[type[StrictModel]] = list(kinds.values())
    done: set[type] = set()
    while todo:
        model = todo.pop()
        if model in done:
            continue
        done.add(model)
        for name, field in model.model_fields.items():
            names.add(field.alias or name)
            for arg in _model_args(field.annotation):
                todo.append(arg)
    _KNOWN[key] = sorted(names)
    return _KNOWN[key]


def _model_args(annotation: Any) -> Iterator[type[StrictModel]]:
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _model_args(arg)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_loc(loc: Loc) -> str:
    """``("spec", "ingress", 0, "toPorts")`` → ``spec.ingress[0].toPorts``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _line_of(node: yaml.Node, loc: Loc) -> int:
    """The line of the deepest YAML node along ``loc`` (the key's line for mappings)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == part:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
