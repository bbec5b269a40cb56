"""Structured outputs and tools, from a request body to its answer: the front ends' one entry point.

    read_structured(body, kind)     -> (the constraint decoding obeys, the tool plan)   on arrival
    assistant_message(text, tools)  -> the chat message (content and tool calls)        on the answer
    answer_check(text, constraint)  -> whether a constrained answer validates           for the metrics

The check on arrival refuses a bad body before anything is queued or reserved (run-batch writes an
error record, serve answers 400). The answer check is independent of the grammar engine where it can
be: JSON answers through `jsonschema`, regex ones through Python's `re`, choices by equality; a
grammar answer is replayed through a fresh matcher.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.structured.spec import Constraint, ConstraintKind
from pdserve.openai.response_format import OutputFormatError, read_constraint
from pdserve.openai.tool_stream import Message, read_message
from pdserve.openai.tools import ToolPlan, read_tools


def read_structured(body: dict[str, Any], kind: str) -> tuple[Constraint | None, ToolPlan | None]:
    """The body's output constraint and tools; OutputFormatError naming what is wrong."""
    constraint = read_constraint(body)
    if kind != "chat":
        if body.get("tools"):
            raise OutputFormatError("tools are for /v1/chat/completions", "invalid_tools")
        return constraint, None
    tools = read_tools(body)
    tool_constraint = tools.constraint() if tools is not None else None
    if tool_constraint is not None and constraint is not None:
        raise OutputFormatError(f"tool_choice {tools.choice.value} constrains the answer to tool calls; drop "
                                f"response_format (or the structured output) or use tool_choice auto", "invalid_tools")
    return constraint or tool_constraint, tools


def assistant_message(text: str, tools: ToolPlan | None) -> Message:
    """The answer as a chat message: tool calls read out when tools were offered."""
    return read_message(text, parse_calls=tools is not None and tools.offered)


def chat_finish_reason(reason: str | None, message: Message) -> str | None:
    """OpenAI's: "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if message.tool_calls and reason == "stop" else reason


def answer_check(text: str, constraint: Constraint, tools: ToolPlan | None = None) -> dict[str, Any]:
    """{"kind", "valid"}: the constraint's kind ("tool_calls" for the calls tool_choice asked for) and whether
    `text` satisfies it; valid None when this cannot tell (a grammar, or a regex Python's `re` does not read)."""
    kind = constraint_kind(constraint, tools)
    if kind == "tool_calls":
        return {"kind": kind, "valid": tool_calls_valid(assistant_message(text, tools), tools)}
    return {"kind": kind, "valid": satisfies(text, constraint)}


def constraint_kind(constraint: Constraint, tools: ToolPlan | None = None) -> str:
    """What the metrics call a constraint: its kind, or "tool_calls" for the calls tool_choice asked for."""
    return "tool_calls" if tools is not None and tools.constraint() == constraint else constraint.kind.value


def tool_calls_valid(message: Message, tools: ToolPlan) -> bool:
    """At least one call, each to an offered function (the named one, if named) with arguments its schema accepts."""
    import jsonschema

    schemas = {t.name: json.loads(t.parameters) for t in tools.tools
               if tools.function is None or t.name == tools.function}
    if not message.tool_calls or (not tools.parallel and len(message.tool_calls) > 1):
        return False
    for call in message.tool_calls:
        fn = call["function"]
        if fn["name"] not in schemas:
            return False
        try:
            jsonschema.validate(json.loads(fn["arguments"]), schemas[fn["name"]])
        except (ValueError, jsonschema.ValidationError):
            return False
    return True


def satisfies(text: str, constraint: Constraint) -> bool | None:
    """Whether `text` satisfies a response format or structured output; None when this cannot tell."""
    if constraint.is_json:
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), constraint.schema(), format_checker=jsonschema.FormatChecker())
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if constraint.kind == ConstraintKind.CHOICE:
        return text in json.loads(constraint.text)
    if constraint.kind == ConstraintKind.REGEX:
        try:
            return re.fullmatch(constraint.text, text) is not None
        except re.error:
            return None
    return None  # a grammar: only the engine that enforced it could replay it
