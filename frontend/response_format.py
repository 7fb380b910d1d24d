"""OpenAI's `response_format` and vLLM's `guided_json` as the one JSON schema the engine holds the
output to (`SamplingParams.json_schema`, engine/structured_output.py).

- `{"type": "text"}` or nothing: free text.
- `{"type": "json_object"}`: any JSON object, that is the schema `{"type": "object"}`.
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`: that
  schema (`strict` changes nothing: the output always matches).
- `guided_json` (vLLM's extra field): a schema, as an object or as JSON text.
- the public gRPC API's `SamplingOptions.json_schema`: the schema as JSON text.

At most one of the two may be given. The schema is compiled here, on the frontend's tokenizer
thread, so that a schema the grammar library refuses, or a server without the library, gets a 400
naming the field before any worker sees the request; each worker compiles it again for its matcher.
"""

from __future__ import annotations

import json
from typing import Any

from tandem.engine.structured_output import check_json_schema
from tandem.frontend.request_rules import RequestError

JSON_OBJECT_SCHEMA = '{"type": "object"}'
RESPONSE_TYPES = ("text", "json_object", "json_schema")


def requested_json_schema(response_format: dict[str, Any] | None, guided_json: Any) -> str | None:
    """The JSON schema text the output must match, or None for free text; raises RequestError."""
    from_format = _schema_of_response_format(response_format)
    if guided_json is not None and from_format is not None:
        raise RequestError("give either response_format or guided_json, not both", "guided_json")
    if guided_json is not None:
        schema, param = _schema_of_guided_json(guided_json), "guided_json"
    else:
        schema, param = from_format, "response_format"
    return None if schema is None else checked_json_schema(schema, param)


def checked_json_schema(schema: str, param: str = "json_schema") -> str:
    """`schema` once the grammar library has compiled it; raises RequestError naming `param`."""
    try:
        check_json_schema(schema)
    except ValueError as exc:
        raise RequestError(f"{param}: {exc}", param) from None
    return schema


def _schema_of_response_format(response_format: dict[str, Any] | None) -> str | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_TYPES:
        raise RequestError(f"response_format.type must be one of {', '.join(RESPONSE_TYPES)}, got "
                           f"{kind!r}", "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise RequestError("response_format of type json_schema needs json_schema.schema, the "
                           "JSON schema as an object", "response_format.json_schema")
    return json.dumps(spec["schema"])


def _schema_of_guided_json(guided_json: Any) -> str:
    if isinstance(guided_json, dict):
        return json.dumps(guided_json)
    if isinstance(guided_json, str):
        try:
            schema = json.loads(guided_json)
        except ValueError:
            raise RequestError("guided_json is a string but not JSON; send the schema as an "
                               "object or as JSON text", "guided_json") from None
        if isinstance(schema, dict):
            return guided_json
    raise RequestError("guided_json must be a JSON schema (an object, or the same as JSON text)",
                       "guided_json")
