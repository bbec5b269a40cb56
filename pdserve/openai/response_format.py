"""A request body's output constraint: OpenAI's `response_format` and vLLM's structured-output extras.

    response_format      {"type": "text"} | {"type": "json_object"}
                         | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs   {"json": schema} | {"regex": str} | {"choice": [str]} | {"grammar": EBNF or Lark}
                         | {"json_object": true}                       (vLLM's extra body field)
    guided_json, guided_regex, guided_choice, guided_grammar          (vLLM's older names)

At most one may be given. The constraint is checked here (engine.structured.spec: an invalid schema,
or a keyword the grammar engine cannot enforce, is named), so a bad body is refused on arrival,
before any KV block is reserved. `strict` is accepted either way: every answer is held to the whole
schema, and a schema that cannot be held to is refused rather than loosened.
"""

from __future__ import annotations

from typing import Any

from engine.structured.spec import Constraint, ConstraintError, ConstraintKind

LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class OutputFormatError(ValueError):
    """What is wrong with a body's output constraint; `code` is the error code the client sees."""

    def __init__(self, message: str, code: str = "invalid_response_format") -> None:
        super().__init__(message)
        self.code = code


def read_constraint(body: dict[str, Any]) -> Constraint | None:
    """The body's output constraint, checked; None when it asks for free text."""
    found = []
    if body.get("response_format") is not None:
        found.append(("response_format", _from_response_format(body["response_format"])))
    extras = body.get("structured_outputs")
    if extras is not None:
        if not isinstance(extras, dict):
            raise OutputFormatError(f"structured_outputs must be an object, got {type(extras).__name__}")
        for key, value in extras.items():
            if value is not None and value is not False:
                found.append((f"structured_outputs.{key}", _from_extra(key, value, f"structured_outputs.{key}")))
    for old, key in LEGACY.items():
        if body.get(old) is not None:
            found.append((old, _from_extra(key, body[old], old)))
    found = [(where, c) for where, c in found if c is not None]
    if len(found) > 1:
        raise OutputFormatError(f"give one output constraint, not {len(found)}: {', '.join(w for w, _ in found)}")
    if not found:
        return None
    where, constraint = found[0]
    try:
        constraint.check()
    except ConstraintError as e:
        raise OutputFormatError(f"{where}: {e}", "unsupported_schema" if e.unsupported
                                else "invalid_response_format") from e
    return constraint


def _from_response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict):
        raise OutputFormatError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind != "json_schema":
        raise OutputFormatError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise OutputFormatError('response_format.json_schema must be an object like {"name": ..., "schema": {...}}')
    schema = spec.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise OutputFormatError("response_format.json_schema.schema must be a JSON schema object")
    strict = spec.get("strict", False)
    if strict is not None and not isinstance(strict, bool):
        raise OutputFormatError(f"response_format.json_schema.strict must be true or false, got {strict!r}")
    return Constraint.json_schema(schema)


def _from_extra(key: str, value: Any, where: str) -> Constraint | None:
    """vLLM's structured-output extras, by their structured_outputs key."""
    if key == "json":
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise OutputFormatError(f"{where} is not valid JSON: {e.msg}") from e
        if not isinstance(value, (dict, bool)):
            raise OutputFormatError(f"{where} must be a JSON schema")
        return Constraint.json_schema(value)
    if key == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT) if value is True else None
    if key == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise OutputFormatError(f"{where} must be a list of strings")
        return Constraint.choice(value)
    if key in ("regex", "grammar"):
        if not isinstance(value, str):
            raise OutputFormatError(f"{where} must be a string")
        return Constraint(ConstraintKind(key), value)
    if key in ("backend", "disable_fallback", "disable_any_whitespace", "disable_additional_properties",
               "whitespace_pattern"):
        return None  # vLLM's engine options: pdserve has one engine and one JSON layout
    raise OutputFormatError(f"{where}: unknown structured output {key!r}; use json, regex, choice, grammar or "
                            f"json_object")
