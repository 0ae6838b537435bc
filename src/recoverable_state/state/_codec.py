"""How a state's value becomes stored bytes and back, and what the round trip could lose.

A `StateCodec` is built once per state type: a pydantic model keeps its own
serializer and validator (the fast path), any other type pydantic can validate
(a dataclass, a TypedDict, `dict[str, int]`, a list) goes through a TypeAdapter.

The promise (what persist writes, initialize reads back equal) is checked
cheaply: the type's core schema is read once to learn what its JSON could lose
(NaN and infinite floats become `null`; deep nesting cannot be loaded back;
validators, constraints, unions or `Any` can turn a value into another), and a
changed value pays for a full validate-and-compare only when its type or its
bytes give a reason to.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, SchemaSerializer, SchemaValidator, from_json

MAX_DEPTH = 200
"""Nesting that pydantic's JSON parser may refuse to load back (its limit is a little higher)."""

_LEAVES = {"int", "bool", "str", "bytes", "none", "date", "datetime", "time", "timedelta", "uuid"}
_BASE_KEYS = {"type", "ref", "metadata"}
_CONTAINER_KEYS = {
    "list": {"items_schema"},
    "set": {"items_schema"},
    "frozenset": {"items_schema"},
    "tuple": {"items_schema", "variadic_item_index"},
    "dict": {"keys_schema", "values_schema"},
    "nullable": {"schema"},
    "default": {"schema", "default", "default_factory", "default_factory_takes_data"},
    "literal": {"expected"},
    "enum": {"cls", "members", "sub_type"},
    "definitions": {"schema", "definitions"},
    "definition-ref": {"schema_ref"},
    "model": {"cls", "schema", "config", "custom_init", "root_model", "generic_origin"},
    "model-fields": {"fields", "model_name", "computed_fields", "extras_schema", "extra_behavior"},
    "model-field": {"schema", "validation_alias", "serialization_alias", "frozen"},
    "dataclass": {"cls", "fields", "schema", "post_init", "slots", "config", "frozen", "generic_origin"},
    "dataclass-args": {"dataclass_name", "fields", "computed_fields", "collect_init_only", "extra_behavior"},
    "dataclass-field": {
        "name",
        "schema",
        "kw_only",
        "init",
        "validation_alias",
        "serialization_alias",
        "frozen",
    },
    "typed-dict": {"fields", "cls", "computed_fields", "extras_schema", "extra_behavior", "total", "config"},
    "typed-dict-field": {"schema", "required", "validation_alias", "serialization_alias"},
    "float": set(),
}


@dataclasses.dataclass
class _SchemaFacts:
    """What a type's JSON round trip could lose, read once from its core schema."""

    exact: bool = True  # False: only a full validate-and-compare can tell
    floats: bool = False  # NaN and infinity would be stored as null
    deep: bool = False  # recursive, or nested deeper than MAX_DEPTH


def _read_schema(schema: Any) -> _SchemaFacts:
    facts = _SchemaFacts()

    def walk(node: Any, depth: int) -> None:
        if not facts.exact:
            return
        if depth > MAX_DEPTH:
            facts.deep = True
            return
        kind = node.get("type")
        allowed = _BASE_KEYS | _CONTAINER_KEYS.get(kind, set())
        if (kind not in _LEAVES and kind not in _CONTAINER_KEYS) or set(node) - allowed:
            facts.exact = False  # constraints, validators, custom serializers, unions, Any...
            return
        if kind == "float":
            facts.floats = True
        elif kind == "definition-ref":
            facts.deep = True  # the definitions themselves are walked once, below
        elif _changes_on_load(kind, node):
            facts.exact = False
        for key, child in node.items():
            if key in ("metadata", "cls", "config", "default", "members", "expected", "sub_type"):
                continue
            nested = depth + (
                1
                if kind
                in (
                    "list",
                    "set",
                    "frozenset",
                    "tuple",
                    "dict",
                    "model-fields",
                    "dataclass-args",
                    "typed-dict",
                )
                else 0
            )
            if isinstance(child, dict) and "type" in child:
                walk(child, nested)
            elif isinstance(child, dict):  # fields by name
                for item in child.values():
                    if isinstance(item, dict) and "type" in item:
                        walk(item, nested)
            elif isinstance(child, list):
                for item in child:
                    if isinstance(item, dict) and "type" in item:
                        walk(item, nested)

    walk(schema, 0)
    return facts


def _changes_on_load(kind: str, node: Any) -> bool:
    """Whether a schema node may load its own JSON back as a different value."""
    if kind in ("model-field", "dataclass-field", "typed-dict-field"):
        return bool(node.get("validation_alias") != node.get("serialization_alias"))
    if kind in ("model-fields", "dataclass-args", "typed-dict"):
        return bool(node.get("computed_fields"))
    if kind == "dataclass":
        return bool(node.get("post_init"))
    if kind == "model":
        return bool(node.get("custom_init")) or node["cls"].model_post_init is not BaseModel.model_post_init
    if kind in ("list", "set", "frozenset"):
        return "items_schema" not in node  # items of any type
    if kind == "dict":
        return "keys_schema" not in node or "values_schema" not in node
    return False


def _schema_nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every node of a core schema, depth first (not those inside metadata, defaults, classes or config)."""
    if isinstance(schema, list):
        for item in schema:
            yield from _schema_nodes(item)
    elif isinstance(schema, dict):
        yield schema
        for key, child in schema.items():
            if key not in ("metadata", "default", "cls", "config"):
                yield from _schema_nodes(child)


def _collect_definitions(schema: Any) -> dict[str, Any]:
    """Every schema node with a `ref`, by ref, so a definition-ref can be followed."""
    found: dict[str, Any] = {}
    for node in _schema_nodes(schema):
        if "ref" in node and "type" in node:
            found.setdefault(node["ref"], node)
    return found


def _allows_extra(schema: Any) -> bool:
    """Whether some model, dataclass or TypedDict in a core schema keeps unknown keys (`extra='allow'`)."""
    return any(
        node.get("extra_behavior") == "allow"
        or (node.get("config") or {}).get("extra_fields_behavior") == "allow"
        for node in _schema_nodes(schema)
    )


def _refuses_extra_on_call() -> bool:
    """Whether this pydantic takes `extra=` when validating (2.12 on; older ones check by serialising)."""
    try:
        TypeAdapter(int).validator.validate_json(b"1", extra="forbid")
    except TypeError:
        return False
    return True


_EXTRA_ON_CALL = _refuses_extra_on_call()


def _dropped(data: Any, node: Any, defs: dict[str, Any], path: tuple[Any, ...], out: list[str]) -> None:
    """Name the stored object keys that `node` (a core schema) has no field for."""
    kind = node.get("type")
    if kind == "definition-ref":
        target = defs.get(node["schema_ref"])
        if target is not None and len(path) < MAX_DEPTH:
            _dropped(data, target, defs, path, out)
        return
    if (
        kind in ("model", "dataclass", "typed-dict")
        and (node.get("config") or {}).get("extra_fields_behavior") == "allow"
    ):
        return
    if kind in ("model", "dataclass", "default", "nullable", "definitions") and "schema" in node:
        if kind != "nullable" or data is not None:
            _dropped(data, node["schema"], defs, path, out)
        return
    if kind in ("model-fields", "typed-dict", "dataclass-args") and isinstance(data, dict):
        fields = node["fields"]
        named = fields.values() if isinstance(fields, dict) else fields
        by_name = {}
        for name, field in zip(
            fields if isinstance(fields, dict) else [f["name"] for f in fields], named, strict=True
        ):
            alias = field.get("validation_alias")
            by_name[alias if isinstance(alias, str) else name] = field
        for key, item in data.items():
            field = by_name.get(key)
            if field is None:
                if node.get("extra_behavior") != "allow":
                    out.append(_where((*path, key)))
            else:
                _dropped(item, field["schema"], defs, (*path, key), out)
        return
    if kind in ("list", "set", "frozenset") and isinstance(data, list) and "items_schema" in node:
        for i, item in enumerate(data):
            _dropped(item, node["items_schema"], defs, (*path, i), out)
    elif kind == "dict" and isinstance(data, dict) and "values_schema" in node:
        for key, item in data.items():
            _dropped(item, node["values_schema"], defs, (*path, key), out)


_CHECK_TRIES = 3
"""Serialisations tried for a value that another thread keeps changing, before its bytes are judged alone."""


class _Changed(Exception):
    """The value changed while its bytes were being checked (another thread)."""


class Refused(Exception):
    """The value cannot be stored so that it loads back equal; `field` says where."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


class StateCodec:
    """Serialise, validate, copy and reset values of one state type."""

    def __init__(self, state_type: Any) -> None:
        self.state_type = state_type
        self.is_model = isinstance(state_type, type) and issubclass(state_type, BaseModel)
        if self.is_model:
            self.name = state_type.__name__
            self.serializer: SchemaSerializer = state_type.__pydantic_serializer__
            self.validator: SchemaValidator = state_type.__pydantic_validator__
            schema: Any = state_type.__pydantic_core_schema__
        else:
            adapter = TypeAdapter(state_type)
            self.name = getattr(state_type, "__name__", None) or str(state_type)
            self.serializer = adapter.serializer
            self.validator = adapter.validator  # type: ignore[assignment]
            schema = adapter.core_schema
        self._facts = _read_schema(schema)
        self._schema = schema
        self._definitions = _collect_definitions(schema)
        self.needs_check = not self._facts.exact or self._facts.floats or self._facts.deep
        """Whether a changed value's bytes must be looked at; False: the type's JSON loses nothing."""
        self.delta_safe = self.is_model and self._facts.exact
        """Whether a delta's bytes need no round-trip check beyond `loads_back_plainly`."""
        self._forbid_first = _EXTRA_ON_CALL and not _allows_extra(schema)
        self.content_type = ""
        """The content type this type's records are written with (set with its schema version)."""
        """Whether a load first validates refusing unknown keys (where they are kept, none is dropped)."""

    def loads_back_plainly(self, data: bytes) -> bool:
        """Whether bytes of this type load back as they were made without a full check.

        So for an exact type, unless a null stands where a float may be (a NaN or an
        infinity that JSON cannot hold) or brackets go past MAX_DEPTH.
        """
        facts = self._facts
        return (
            facts.exact
            and not (facts.floats and b"null" in data)
            and not (facts.deep and data.count(b"[") + data.count(b"{") > MAX_DEPTH)
        )

    # -- the hot path ----------------------------------------------------------

    def check(self, value: Any, data: bytes, *, suspect: bool = False) -> bytes:
        """The bytes to store for `value`: `data` (its bytes) if they would load back equal to it.

        Raises Refused when they would not. `suspect`: the serializer warned that a
        value does not have its declared type. Another thread may change `value`
        while this runs (a sync worker outside `editing()`): a difference that comes
        from such a change is never a refusal; the value is serialised again and the
        new bytes checked, and a value that changes on every try is judged by its
        bytes alone (they must load back to themselves).
        """
        if not suspect and self.loads_back_plainly(data):
            return data
        for _ in range(_CHECK_TRIES):
            try:
                self._check_fully(value, data)
                return data
            except _Changed:  # the value changed since `data` was made: take it again
                data = self.serializer.to_json(value, by_alias=True, warnings=False)
        self._check_bytes(data)
        return data

    def load(self, data: bytes) -> tuple[Any, list[str]]:
        """Validate stored JSON bytes; also name the stored fields the type no longer has."""
        if self._forbid_first:
            # The usual record has no key the type lacks: refusing unknown keys, at every
            # depth, proves in the validation itself that nothing was dropped.
            try:
                return self.validator.validate_json(data, extra="forbid"), []
            except ValidationError:  # unknown keys, or a bad record
                pass
        value = self.validator.validate_json(data)
        # Serialising the value gives the stored bytes back when no field was dropped (where
        # validation cannot tell): a fifth of the cost of walking the record for them.
        try:
            if self.serializer.to_json(value, by_alias=True, warnings=False) == data:
                return value, []
        except Exception:  # only the warning could be lost, never the value
            pass
        dropped: list[str] = []
        with contextlib.suppress(Exception):  # only the warning could be lost, never the value
            _dropped(from_json(data), self._schema, self._definitions, (), dropped)
        return value, dropped

    # -- copies and resets -----------------------------------------------------

    def copy(self, value: Any) -> Any:
        """A deep copy of `value` (the default state), so the default is never changed."""
        if self.is_model:
            return value.model_copy(deep=True)
        return copy.deepcopy(value)

    def reset_in_place(self, target: Any, fresh: Any) -> Any:
        """Make `target` equal to `fresh` without replacing it; the object to keep using.

        The worker holds `target` and goes on changing it, so it must stay the object
        that is persisted. Values that cannot change in place (an int, a tuple) are
        replaced by `fresh`.
        """
        if isinstance(target, BaseModel) and type(target) is type(fresh):
            for slot in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
                object.__setattr__(target, slot, getattr(fresh, slot))
            return target
        if dataclasses.is_dataclass(target) and type(target) is type(fresh):
            for field in dataclasses.fields(target):
                object.__setattr__(target, field.name, getattr(fresh, field.name))
            return target
        if isinstance(target, dict) and isinstance(fresh, dict):
            target.clear()
            target.update(fresh)
            return target
        if isinstance(target, list) and isinstance(fresh, list):
            target[:] = fresh
            return target
        if isinstance(target, set) and isinstance(fresh, set):
            target.clear()
            target.update(fresh)
            return target
        return fresh

    # -- the slow path, taken only with a reason -------------------------------

    def dump_leniently(self, value: Any) -> bytes:
        """Bytes for a value of unexpected types, or Refused naming what cannot be stored."""
        suspect = self._suspect(value)
        if suspect is not None:
            raise Refused(*suspect)
        try:
            data = self.serializer.to_json(value, by_alias=True, warnings=False)
        except PydanticSerializationError as exc:
            raise Refused("(the state)", f"cannot be serialised to JSON: {exc}") from None
        return self.check(value, data, suspect=True)

    def _check_fully(self, value: Any, data: bytes) -> None:
        """Refused if `data` loads back unlike `value`; _Changed if `value` is no longer what made `data`."""
        suspect = self._suspect(value)
        if suspect is not None:
            raise Refused(*suspect)
        back = self._load_back(data)
        if back == value:
            return
        before = self.serializer.to_python(value, by_alias=True, warnings=False)
        after = self.serializer.to_python(back, by_alias=True, warnings=False)
        where = _difference(before, after, ())
        if where is None:
            return
        if self.serializer.to_json(value, by_alias=True, warnings=False) != data:
            raise _Changed  # another thread changed the value: not a refusal
        raise Refused(
            _where(where[0]) if where[0] else "(the state)", f"loads back as {where[2]!r}, not {where[1]!r}"
        )

    def _check_bytes(self, data: bytes) -> None:
        """Refused unless `data` loads back to a value whose bytes are `data` again (no value needed)."""
        back = self._load_back(data)
        again = self.serializer.to_json(back, by_alias=True, warnings=False)
        if again != data:
            raise Refused("(the state)", "would not load back as it was stored (its bytes change on reload)")

    def _load_back(self, data: bytes) -> Any:
        try:
            return self.validator.validate_json(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise Refused(_where(err["loc"]), f"would not load back: {err['msg']}") from None

    def _suspect(self, value: Any) -> tuple[str, str] | None:
        """What a JSON round trip loses for sure: NaN/inf, non-UTF-8 bytes, deep nesting."""
        try:
            plain = self.serializer.to_python(value, by_alias=True, warnings=False)
        except Exception:
            return None
        return _find_suspect(plain, (), 0)


def _find_suspect(node: Any, path: tuple[Any, ...], depth: int) -> tuple[str, str] | None:
    if depth > MAX_DEPTH:
        return (
            _where(path[:3]) + "...",
            f"is nested {MAX_DEPTH} or more levels deep, deeper than JSON loading allows",
        )
    if isinstance(node, float) and not math.isfinite(node):
        return _where(path), f"holds {node!r}, which JSON stores as null"
    if isinstance(node, bytes | bytearray):
        try:
            bytes(node).decode("utf-8")
        except UnicodeDecodeError:
            return _where(path), "holds bytes that are not UTF-8 text, which JSON cannot store"
    if isinstance(node, dict):
        for key, item in node.items():
            found = _find_suspect(item, (*path, key), depth + 1)
            if found is not None:
                return found
    elif isinstance(node, list | tuple | set | frozenset):
        for i, item in enumerate(node):
            found = _find_suspect(item, (*path, i), depth + 1)
            if found is not None:
                return found
    return None


def _difference(a: Any, b: Any, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any] | None:
    """The first place two plain values differ (NaN equal to NaN), or None."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                return (*path, key), a.get(key), b.get(key)
            found = _difference(a[key], b[key], (*path, key))
            if found is not None:
                return found
        return None
    if type(a) is not type(b):
        return path, a, b  # a tuple stored as a JSON array loads back as a list: not the same value
    if isinstance(a, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, (*path, i))
            if found is not None:
                return found
        return None
    if type(a) is not type(b) or a != b:
        return path, a, b
    return None


def _where(loc: Any) -> str:
    return ".".join(str(p) for p in loc) or "(the state)"


@functools.lru_cache(maxsize=256)
def codec_for(state_type: Any) -> StateCodec:
    """The codec of a state type, built once (reading a schema costs a walk)."""
    return StateCodec(state_type)


def infer_state_type(value: Any) -> Any:
    """The type a default value is validated as: its class, or dict/list of any JSON."""
    if isinstance(value, BaseModel):
        return type(value)
    if isinstance(value, dict):
        return dict[str, Any]
    if isinstance(value, list):
        return list[Any]
    return type(value)


def describe_validation_error(exc: ValidationError) -> str:
    """Name each failing field and what is wrong with it, on one line."""
    return "; ".join(f"{_where(err['loc'])}: {err['msg']}" for err in exc.errors())
