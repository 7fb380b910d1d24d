"""response_format and guided_json become one JSON schema, or a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from tandem.frontend.request_rules import RequestError
from tandem.frontend.response_format import JSON_OBJECT_SCHEMA, requested_json_schema

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_each_form_gives_its_schema():
    assert requested_json_schema(None, None) is None
    assert requested_json_schema({"type": "text"}, None) is None
    assert requested_json_schema({"type": "json_object"}, None) == JSON_OBJECT_SCHEMA
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert json.loads(requested_json_schema(spec, None)) == SCHEMA
    assert json.loads(requested_json_schema(None, SCHEMA)) == SCHEMA
    assert requested_json_schema(None, json.dumps(SCHEMA)) == json.dumps(SCHEMA)


@pytest.mark.parametrize("response_format, guided_json, param, words", [
    ({"type": "yaml"}, None, "response_format.type", "must be one of"),
    ({"type": "json_schema"}, None, "response_format.json_schema", "needs json_schema.schema"),
    ({"type": "json_object"}, SCHEMA, "guided_json", "not both"),
    (None, "{oops", "guided_json", "not JSON"),
    (None, [1], "guided_json", "must be a JSON schema"),
    (None, {"type": "nonsense"}, "guided_json", "cannot be used for structured output"),
])
def test_bad_requests_name_the_field(response_format, guided_json, param, words):
    with pytest.raises(RequestError, match=words) as info:
        requested_json_schema(response_format, guided_json)
    assert info.value.param == param
