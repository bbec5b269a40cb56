"""What a request's output must match: a frozen spec that travels in SamplingParams to every worker.

    kind          text                                    the answer is
    json_object   ""                                      any JSON object
    json_schema   the schema, as JSON                     a JSON value the schema accepts
    regex         the pattern (Rust `regex` syntax)       a full match of it
    choice        the choices, as a JSON list of strings  one of them, exactly
    grammar       Lark, or GBNF/EBNF (`root ::= ...`)     a sentence of the grammar

The spec is plain text, so a worker rebuilds the same matcher from it (engine/structured/matcher.py)
and the grammar state never has to be serialized: replaying a request's output tokens into a fresh
matcher gives the state exactly. `check` refuses what the grammar engine (llguidance) cannot enforce,
naming the keyword, so a bad request is refused where it arrives, before any KV is reserved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

# JSON is written compactly on one line with a space after ',' and ':' (as json.dumps does): free
# whitespace lets a small model pad an answer with newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintKind(str, Enum):
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


class ConstraintError(ValueError):
    """A constraint that is invalid, or that cannot be enforced exactly (`unsupported`: a keyword the
    engine does not implement); the message names what is wrong."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


@dataclass(frozen=True)
class Constraint:
    kind: ConstraintKind
    text: str = ""

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Constraint:
        return cls(ConstraintKind.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False))

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> Constraint:
        return cls(ConstraintKind.CHOICE, json.dumps(list(choices), ensure_ascii=False))

    @property
    def is_json(self) -> bool:
        return self.kind in (ConstraintKind.JSON_OBJECT, ConstraintKind.JSON_SCHEMA)

    def schema(self) -> dict | bool | None:
        """The JSON schema the answer must satisfy (json kinds), else None."""
        if self.kind == ConstraintKind.JSON_OBJECT:
            return {"type": "object"}
        return json.loads(self.text) if self.kind == ConstraintKind.JSON_SCHEMA else None

    def grammar(self) -> str:
        """The llguidance grammar text (a top-level grammar as JSON); cached per spec."""
        return _grammar(self)

    def check(self) -> None:
        """Raise ConstraintError unless the engine can enforce this constraint exactly."""
        _check(self)


@lru_cache(maxsize=1024)
def _grammar(c: Constraint) -> str:
    import llguidance

    if c.kind in (ConstraintKind.JSON_OBJECT, ConstraintKind.JSON_SCHEMA):
        schema = c.schema()
        if schema is True:  # the schema that accepts any value
            schema = {}
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=dict(JSON_OPTIONS))
    if c.kind == ConstraintKind.CHOICE:
        choices = json.loads(c.text)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in choices))
    if c.kind == ConstraintKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(c.text)
    return llguidance.grammar_from("grammar", c.text)  # Lark as is; GBNF (`::=`) converted to Lark


@lru_cache(maxsize=1024)
def _check(c: Constraint) -> None:
    import llguidance

    if c.kind == ConstraintKind.JSON_SCHEMA:
        check_schema(json.loads(c.text))
        if json.loads(c.text) is False:
            raise ConstraintError("the schema false accepts no answer")
    elif c.kind == ConstraintKind.CHOICE:
        choices = json.loads(c.text)
        if not choices or not all(isinstance(s, str) and s for s in choices):
            raise ConstraintError("choice must be a non-empty list of non-empty strings")
    elif not c.text and c.kind != ConstraintKind.JSON_OBJECT:
        raise ConstraintError(f"{c.kind.value} must be a non-empty string")
    try:
        grammar = c.grammar()
    except Exception as e:  # noqa: BLE001 - the converters raise several types for bad text
        raise ConstraintError(f"invalid {c.kind.value}: {e}") from e
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        why = messages[0].strip()
        unsupported = any(w in why for w in ("Unimplemented", "not supported", "Unsupported", "Unknown format"))
        raise ConstraintError(f"{c.kind.value} {'cannot be enforced' if unsupported else 'is invalid'}: {why}",
                              unsupported)


def check_schema(schema: object) -> None:
    """ConstraintError for a schema the JSON Schema meta-schema refuses, naming the path of the bad keyword."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConstraintError(f"invalid JSON schema at {where}: {e.message}") from e
