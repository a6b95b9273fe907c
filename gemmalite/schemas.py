"""What a caller asks the reply to follow, and the JSON Schema rewrites that keep it finite.

A `Constraint` is one caller's json_schema, regex or grammar, checked for shape (grammar.py
compiles it). Two rewrites make a schema's values end for a small model without changing what
fits it: `closed_objects` allows only the properties an object lists (unless the schema says
otherwise), and `bounded_integers` holds an integer it leaves unbounded to +-(2**53 - 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidArgumentError

ANY_OBJECT = '{"type": "object"}'  # json_schema=True: any JSON object (OpenAI's json_object)


@dataclass(frozen=True)
class Constraint:
    """One caller's constraint: `kind` is "json_schema", "regex" or "grammar" (Lark or GBNF)."""

    kind: str
    source: str  # the schema as JSON text, the regex, or the grammar


def constraint_from(json_schema=None, regex=None, grammar=None) -> Constraint | None:
    """The constraint the generation options ask for (None for none), checked for shape.

    `json_schema` is a dict, its JSON text, or True for any JSON object; `regex` a regular
    expression the whole reply matches; `grammar` a Lark or GBNF grammar. One of them at most.
    """
    asked = (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
    given = [name for name, value in asked if value is not None and value is not False]
    if len(given) > 1:
        raise InvalidArgumentError(f"{' and '.join(given)} cannot be combined: give one constraint for the reply")
    if json_schema is True:
        return Constraint("json_schema", ANY_OBJECT)
    if json_schema is not None and json_schema is not False:
        return Constraint("json_schema", schema_text(json_schema))
    for kind, value in (("regex", regex), ("grammar", grammar)):
        if value is not None:
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{kind} must be a non-empty string, got {value!r:.80}")
            return Constraint(kind, value)
    return None


def schema_text(schema) -> str:
    """A JSON Schema given as a dict or as JSON text, as JSON text (its property order kept)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidArgumentError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidArgumentError(
            f"json_schema must be a JSON Schema object (a dict or its JSON text), or True for any JSON object; got {schema!r:.80}"
        )
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"json_schema cannot be written as JSON: {e}") from None


SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "additionalItems", "unevaluatedItems")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SAFE_INTEGER = 2**53 - 1  # the largest integer every JSON parser reads exactly (JavaScript's MAX_SAFE_INTEGER)


def each_schema(schema, change):
    """`schema` with `change(node)` applied to a copy of it and of every schema inside it."""
    if isinstance(schema, list):
        return [each_schema(s, change) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SUBSCHEMA:
        if isinstance(out.get(key), (dict, list)):
            out[key] = each_schema(out[key], change)
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [each_schema(s, change) for s in out[key]]
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: each_schema(s, change) for name, s in out[key].items()}
    change(out)
    return out


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that lists properties and says
    nothing of others: the reply then uses only the properties named, and still fits the schema."""

    def close(node: dict) -> None:
        opens = ("additionalProperties", "patternProperties", "unevaluatedProperties")
        if isinstance(node.get("properties"), dict) and not any(k in node for k in opens):
            node["additionalProperties"] = False

    return each_schema(schema, close)


def bounded_integers(schema):
    """The schema with every `integer` held to +-SAFE_INTEGER where it sets no bound of its own. A
    JSON integer has no length limit, and a small model left to write one may write zeros until
    max_new_tokens; bounded, it has at most 16 digits, and the value still fits the schema."""

    def bound(node: dict) -> None:
        if node.get("type") in ("integer", ["integer"]):
            if "maximum" not in node and "exclusiveMaximum" not in node:
                node["maximum"] = SAFE_INTEGER
            if "minimum" not in node and "exclusiveMinimum" not in node:
                node["minimum"] = -SAFE_INTEGER

    return each_schema(schema, bound)
