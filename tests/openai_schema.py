"""Validation against OpenAI's own published OpenAPI description (``../shared``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import unavailable

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"


def nullable_as_json_schema(node: Any) -> Any:
    """OpenAI's document still marks nullable fields the OpenAPI 3.0 way (``nullable: true``);
    in JSON Schema 2020-12 that is ``null`` added to the allowed types."""
    if isinstance(node, list):
        return [nullable_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: nullable_as_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def registry() -> Registry:
    document = nullable_as_json_schema(json.loads(SPEC.read_text()))
    return Registry().with_resource("urn:openai", Resource(document, DRAFT202012))


def validate(instance: Any, schema_name: str) -> None:
    if not SPEC.exists():
        unavailable(f"OpenAI's OpenAPI description is not at {SPEC}")
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=registry()).validate(instance)


@cache
def stored_messages_registry() -> Registry:
    """OpenAI's description of a stored completion's messages reuses the *response* message
    schema, whose ``role`` may only be ``assistant``, while the messages it lists are the
    request's (OpenAI's own example in that schema shows ``"role": "user"``). Everything
    else is kept; ``role`` admits the roles a request's messages have."""
    document = nullable_as_json_schema(json.loads(SPEC.read_text()))
    schemas = document["components"]["schemas"]
    message = json.loads(json.dumps(schemas["ChatCompletionResponseMessage"]))
    message["properties"]["role"]["enum"] = ["system", "developer", "user", "assistant", "tool"]
    schemas["StoredRequestMessage"] = message
    items = schemas["ChatCompletionMessageList"]["properties"]["data"]["items"]
    items["allOf"][0] = {"$ref": "#/components/schemas/StoredRequestMessage"}
    return Registry().with_resource("urn:openai", Resource(document, DRAFT202012))


def validate_stored_messages(instance: Any) -> None:
    if not SPEC.exists():
        unavailable(f"OpenAI's OpenAPI description is not at {SPEC}")
    schema = {"$ref": "urn:openai#/components/schemas/ChatCompletionMessageList"}
    validator = jsonschema.Draft202012Validator(schema, registry=stored_messages_registry())
    validator.validate(instance)
