"""OTLP trace payloads -> Loom's internal span dicts (see ``telemetry.span_to_dict``).

Two edges: the protobuf ``ExportTraceServiceRequest`` (OTLP/gRPC and OTLP/HTTP protobuf) and the
OTLP/HTTP JSON body, which is what Triton sends. Both raise ``ValueError`` on malformed input.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SpanDict = dict[str, Any]

UNKNOWN_SERVICE = "unknown_service"
_TRACE_ID_BYTES = 16
_SPAN_ID_BYTES = 8

# OTLP enum numbers; SPAN_KIND_UNSPECIFIED is read as INTERNAL, as the spec says.
_KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUSES = {0: "UNSET", 1: "OK", 2: "ERROR"}


def spans_from_proto(req: ExportTraceServiceRequest) -> list[SpanDict]:
    """Every span of a protobuf export request, flattened."""
    out: list[SpanDict] = []
    for rs in req.resource_spans:
        resource = _proto_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                where = f"span {span.name!r}"
                out.append(
                    _span(
                        name=span.name,
                        trace_id=_id_hex(span.trace_id, _TRACE_ID_BYTES, f"{where}: trace_id"),
                        span_id=_id_hex(span.span_id, _SPAN_ID_BYTES, f"{where}: span_id"),
                        parent_id=_parent_hex(span.parent_span_id, f"{where}: parent_span_id"),
                        kind=_KINDS.get(span.kind, "INTERNAL"),
                        resource=resource,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=_STATUSES.get(span.status.code, "UNSET"),
                        attributes=_proto_attributes(span.attributes),
                    )
                )
    return out


def spans_from_json(doc: Any) -> list[SpanDict]:
    """Every span of an OTLP/HTTP JSON body (already parsed with ``json.loads``)."""
    if not isinstance(doc, dict):
        raise ValueError("OTLP JSON body must be an object")
    out: list[SpanDict] = []
    for i, rs in enumerate(_list(doc, "resourceSpans", "body")):
        where_rs = f"resourceSpans[{i}]"
        rs = _obj(rs, where_rs)
        resource = _json_attributes(_obj(_get(rs, "resource") or {}, f"{where_rs}.resource"), f"{where_rs}.resource")
        # instrumentationLibrarySpans is the pre-1.0 name of scopeSpans; old SDKs still send it.
        scopes = _list(rs, "scopeSpans", where_rs) or _list(rs, "instrumentationLibrarySpans", where_rs)
        for j, ss in enumerate(scopes):
            where_ss = f"{where_rs}.scopeSpans[{j}]"
            for k, span in enumerate(_list(_obj(ss, where_ss), "spans", where_ss)):
                out.append(_json_span(_obj(span, f"{where_ss}.spans[{k}]"), resource, f"{where_ss}.spans[{k}]"))
    return out


def _span(
    *,
    name: str,
    trace_id: str,
    span_id: str,
    parent_id: str | None,
    kind: str,
    resource: Mapping[str, Any],
    start_ns: int,
    end_ns: int,
    status: str,
    attributes: dict[str, Any],
) -> SpanDict:
    service = resource.get("service.name")
    replica = resource.get("service.instance.id")
    return {
        "name": name,
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent_id,
        "kind": kind,
        "service": str(service) if service else UNKNOWN_SERVICE,
        "replica": str(replica) if replica else None,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "status": status,
        "attributes": attributes,
    }


# --- protobuf ---------------------------------------------------------------------------------------------------


def _id_hex(raw: bytes, size: int, where: str) -> str:
    if len(raw) != size:
        raise ValueError(f"{where} must be {size} bytes, got {len(raw)}")
    if not any(raw):
        raise ValueError(f"{where} is all zeros")
    return raw.hex()


def _parent_hex(raw: bytes, where: str) -> str | None:
    # Empty (or, from some exporters, all zeros) means "no parent".
    return None if not any(raw) else _id_hex(raw, _SPAN_ID_BYTES, where)


def _proto_attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value) for kv in kvs}


def _proto_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_proto_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _proto_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return getattr(v, which)


# --- JSON -------------------------------------------------------------------------------------------------------


def _camel_to_snake(key: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def _get(obj: Mapping[str, Any], key: str) -> Any:
    """A field by its lowerCamelCase JSON name, or by the proto field name (both are valid protobuf JSON)."""
    value = obj.get(key)
    return obj.get(_camel_to_snake(key)) if value is None else value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = _get(obj, key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key} must be an array")
    return value


def _json_span(span: dict[str, Any], resource: Mapping[str, Any], where: str) -> SpanDict:
    name = _get(span, "name")
    if not isinstance(name, str):
        raise ValueError(f"{where}.name must be a string")
    parent = _get(span, "parentSpanId")
    status = _get(span, "status") or {}
    return _span(
        name=name,
        trace_id=_json_id(_get(span, "traceId"), _TRACE_ID_BYTES, f"{where}.traceId"),
        span_id=_json_id(_get(span, "spanId"), _SPAN_ID_BYTES, f"{where}.spanId"),
        parent_id=None if not parent else _json_parent(parent, f"{where}.parentSpanId"),
        kind=_json_enum(_get(span, "kind"), "SPAN_KIND_", _KINDS, "INTERNAL", f"{where}.kind"),
        resource=resource,
        start_ns=_json_uint(_get(span, "startTimeUnixNano"), f"{where}.startTimeUnixNano"),
        end_ns=_json_uint(_get(span, "endTimeUnixNano"), f"{where}.endTimeUnixNano"),
        status=_json_enum(
            _get(_obj(status, f"{where}.status"), "code"), "STATUS_CODE_", _STATUSES, "UNSET", f"{where}.status.code"
        ),
        attributes=_json_attributes(span, where),
    )


def _json_id_bytes(value: Any, size: int, where: str) -> bytes:
    """Hex per the OTLP JSON spec; base64 (the generic protobuf JSON mapping) is accepted too."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    try:
        raw = bytes.fromhex(value) if len(value) == 2 * size else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"{where} is neither {2 * size} hex characters nor base64: {value[:40]!r}") from None
    if len(raw) != size:
        raise ValueError(f"{where} must be {size} bytes, got {len(raw)}")
    return raw


def _json_id(value: Any, size: int, where: str) -> str:
    return _id_hex(_json_id_bytes(value, size, where), size, where)


def _json_parent(value: Any, where: str) -> str | None:
    raw = _json_id_bytes(value, _SPAN_ID_BYTES, where)
    return raw.hex() if any(raw) else None


def _json_uint(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{where} must be an integer or a decimal string")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{where} is not a decimal integer: {value!r}") from None
    if number < 0:
        raise ValueError(f"{where} must not be negative")
    return number


def _json_enum(value: Any, prefix: str, names: Mapping[int, str], default: str, where: str) -> str:
    """An enum given as its number or its name ("SPAN_KIND_SERVER", "STATUS_CODE_ERROR")."""
    if value is None:
        return default
    if isinstance(value, str) and not value.isdigit():
        name = value.removeprefix(prefix)
        if name == "UNSPECIFIED":
            return default
        if name not in names.values():
            raise ValueError(f"{where}: unknown enum value {value!r}")
        return name
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{where}: enum must be a number or a name")
    return names.get(int(value), default)


def _json_attributes(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, kv in enumerate(_list(obj, "attributes", where)):
        kv = _obj(kv, f"{where}.attributes[{i}]")
        key = kv.get("key")
        if not isinstance(key, str):
            raise ValueError(f"{where}.attributes[{i}].key must be a string")
        out[key] = _json_value(kv.get("value"), f"{where}.attributes[{i}].value")
    return out


def _json_value(value: Any, where: str) -> Any:
    if value is None:
        return None
    value = _obj(value, where)
    if not value:
        return None
    if (s := _get(value, "stringValue")) is not None:
        return str(s)
    if (b := _get(value, "boolValue")) is not None:
        if not isinstance(b, bool):
            raise ValueError(f"{where}.boolValue must be true or false")
        return b
    if (n := _get(value, "intValue")) is not None:
        # int64 is a string in protobuf JSON, but numbers are accepted as well.
        if isinstance(n, bool) or not isinstance(n, int | str):
            raise ValueError(f"{where}.intValue must be an integer")
        try:
            return int(n)
        except ValueError:
            raise ValueError(f"{where}.intValue is not an integer: {n!r}") from None
    if (d := _get(value, "doubleValue")) is not None:
        if isinstance(d, bool) or not isinstance(d, int | float | str):
            raise ValueError(f"{where}.doubleValue must be a number")
        try:
            return float(d)  # also "NaN" and "Infinity", as protobuf JSON writes them
        except ValueError:
            raise ValueError(f"{where}.doubleValue is not a number: {d!r}") from None
    if (a := _get(value, "arrayValue")) is not None:
        return [
            _json_value(x, f"{where}.arrayValue[{i}]") for i, x in enumerate(_list(_obj(a, where), "values", where))
        ]
    if (kvl := _get(value, "kvlistValue")) is not None:
        return _json_attributes({"attributes": _list(_obj(kvl, where), "values", where)}, where)
    if (raw := _get(value, "bytesValue")) is not None:
        return str(raw)
    raise ValueError(f"{where} has no known value field: {sorted(value)}")
