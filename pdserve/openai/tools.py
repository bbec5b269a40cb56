"""Tool calls: `tools`, `tool_choice` and `parallel_tool_calls` in, `message.tool_calls` out.

The format is Hermes' (NousResearch; Qwen2.5 and others write it too), one call per block:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a block holding a JSON list of calls (SmolLM2's format) is read as several calls. A chat template
that renders `tools` itself gets them; one that does not (the default model's) gets them in a system
message, with the instructions to answer in that format. Earlier turns' calls and results are
rendered as text (`<tool_call>` and `<tool_response>` blocks).

    tool_choice   prompt     constraint                                  parsed
    none          no tools   none                                        no
    auto          tools      none (the model may answer in words)        yes
    required      tools      one call (or several, parallel_tool_calls)  yes
    {"type": "function", "function": {"name": f}}
                  tools      one call to f, its arguments f's schema     yes

A constrained call is a Lark grammar embedding each function's parameter schema (llguidance's
`%json`), so its arguments validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine.structured.spec import JSON_OPTIONS, Constraint, ConstraintError, ConstraintKind, check_schema
from pdserve.openai.response_format import OutputFormatError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function "
    "call return a json object with function name and arguments within <tool_call></tool_call> XML tags as "
    "follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>")


class ToolChoice(str, Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"  # one named function


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: str  # the JSON schema of the arguments, as JSON

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of the prompt, the decoding and the answer."""

    tools: tuple[Tool, ...]
    choice: ToolChoice
    function: str | None = None  # ToolChoice.FUNCTION: its name
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """The tools are in the prompt and the answer is read for calls."""
        return self.choice != ToolChoice.NONE

    def constraint(self) -> Constraint | None:
        """The grammar of the calls `required` or a named function asks for; None otherwise."""
        if self.choice not in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
            return None
        chosen = [t for t in self.tools if self.choice == ToolChoice.REQUIRED or t.name == self.function]
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name},
                                                            "arguments": json.loads(t.parameters)},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in chosen],
                "x-guidance": JSON_OPTIONS}
        many = self.parallel and self.choice == ToolChoice.REQUIRED
        start = 'start: call ("\\n" call)*' if many else "start: call"
        opening, closing = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)
        return Constraint(ConstraintKind.GRAMMAR, f"{start}\ncall: {opening} %json {json.dumps(call)} {closing}\n")

    def system_prompt(self) -> str:
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in self.tools))


def read_tools(body: dict[str, Any]) -> ToolPlan | None:
    """The body's tools and tool_choice, checked; None when it offers none."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise OutputFormatError(f"tool_choice {choice!r} needs tools", "invalid_tools")
        return None
    if not isinstance(raw, list):
        raise OutputFormatError('tools must be a list of {"type": "function", "function": {...}}', "invalid_tools")
    tools = tuple(_tool(i, t) for i, t in enumerate(raw))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise OutputFormatError(f"tool names must be unique, got {names}", "invalid_tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise OutputFormatError(f"parallel_tool_calls must be true or false, got {parallel!r}", "invalid_tools")
    plan = ToolPlan(tools, *_choice(choice, names), parallel=parallel)
    constraint = plan.constraint()
    if constraint is not None:  # required or a named function: the chosen schemas must be enforceable
        try:
            constraint.check()
        except ConstraintError as e:
            raise OutputFormatError(f"tool_choice {plan.choice.value}: the tools' parameters {e}",
                                    "unsupported_schema" if e.unsupported else "invalid_tools") from e
    return plan


def _tool(i: int, t: Any) -> Tool:
    fn = t.get("function") if isinstance(t, dict) else None
    if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
        raise OutputFormatError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}',
                                "invalid_tools")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise OutputFormatError(f"tools[{i}].function.name must be a non-empty string of at most 64 characters",
                                "invalid_tools")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise OutputFormatError(f"tools[{i}].function.parameters must be a JSON schema object", "invalid_tools")
    try:  # a valid schema; whether it can be enforced matters only when tool_choice constrains the call
        check_schema(params)
    except ConstraintError as e:
        raise OutputFormatError(f"tools[{i}].function.parameters: {e}", "invalid_tools") from e
    description = fn.get("description") or ""
    return Tool(name, description if isinstance(description, str) else "", json.dumps(params, ensure_ascii=False))


def _choice(choice: Any, names: list[str]) -> tuple[ToolChoice, str | None]:
    if choice is None or choice == "auto":
        return ToolChoice.AUTO, None
    if choice in ("none", "required"):
        return ToolChoice(choice), None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and choice.get("type", "function") == "function":
        if fn.get("name") not in names:
            raise OutputFormatError(f"tool_choice names {fn.get('name')!r}, which is not among the tools {names}",
                                    "invalid_tools")
        return ToolChoice.FUNCTION, fn["name"]
    raise OutputFormatError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": ...}}', "invalid_tools")


def chat_messages(messages: list[Any], plan: ToolPlan | None, native_tools: bool) -> list[Any]:
    """The conversation with earlier calls and results as text and, unless the template renders tools
    itself (`native_tools`), the tools in a system message. Messages without tool parts pass unchanged
    (the caller checks them)."""
    out = [_as_text(i, m) for i, m in enumerate(messages)]
    if plan is None or not plan.offered or native_tools:
        return out
    prompt = plan.system_prompt()
    if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer") \
            and isinstance(out[0].get("content"), str):
        return [{**out[0], "content": out[0]["content"] + "\n\n" + prompt}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]


def _as_text(i: int, m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    if m.get("role") == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise OutputFormatError(f"messages[{i}].tool_calls must be a list")
        blocks = [CALL_OPEN + "\n" + json.dumps(_call_json(i, c), ensure_ascii=False) + "\n" + CALL_CLOSE
                  for c in calls]
        text = m.get("content") or ""
        return {"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(blocks)}
    if m.get("role") == "tool" and isinstance(m.get("content"), str):
        return {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    return m


def _call_json(i: int, call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise OutputFormatError(f'messages[{i}].tool_calls entries must be {{"function": {{"name", "arguments"}}}}')
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError as e:
        raise OutputFormatError(f"messages[{i}].tool_calls: arguments of {fn['name']!r} are not JSON: {e.msg}") from e
    return {"name": fn["name"], "arguments": args}
