"""The OpenAI batch file format in (the format `vllm run-batch` also reads), one JSON object per line:

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0, ...}}

The body is the OpenAI request the online server takes too (pdserve.openai.requests); the output lines are
OpenAI batch output records (pdserve.openai.records), one per input line, in the order requests finish. A
line that cannot be served becomes a record with `"response": null, "error": {"code", "message"}`; the
batch goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pdserve.openai.limits import ModelLimits
from pdserve.openai.requests import ENDPOINTS, InvalidRequest, build_request
from router.request import Request

MAX_LINE_BYTES = 8 << 20  # a longer line is refused (line_too_long) without being read whole


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str | None
    request: Request | None = None
    error: InvalidRequest | None = None


def iter_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each non-empty line; None for a line longer than `max_bytes`.

    Reads at most `max_bytes` + 1 bytes of a line into memory, so a huge line costs no more.
    """
    number = 0
    while True:
        raw = stream.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(1 << 20)
            yield number, None
            continue
        if raw.strip():
            yield number, raw


def parse_line(number: int, raw: bytes | None, tokenizer: Any, limits: ModelLimits, seen_ids: set[str],
               max_line_bytes: int = MAX_LINE_BYTES) -> ParsedLine:
    """Line `number` (`raw`: None for a line longer than `max_line_bytes`) as a request, or its error."""
    custom_id = None
    try:
        obj = _json_object(raw, max_line_bytes)
        custom_id = _custom_id(obj)
        if custom_id in seen_ids:
            raise InvalidRequest(f"custom_id {custom_id!r} appears on an earlier line; each must be unique",
                                 "duplicate_custom_id")
        seen_ids.add(custom_id)
        kind, body = _endpoint_and_body(obj)
        return ParsedLine(number, custom_id, request=build_request(number, custom_id, kind, body, tokenizer, limits))
    except InvalidRequest as e:
        return ParsedLine(number, custom_id, error=e)


def _json_object(raw: bytes | None, max_line_bytes: int) -> dict:
    if raw is None:
        raise InvalidRequest(f"line is longer than {max_line_bytes} bytes", "line_too_long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"line is not valid UTF-8 (byte {e.start})", "invalid_encoding") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"invalid JSON: {e.msg} at column {e.colno}", "invalid_json") from e
    if not isinstance(obj, dict):
        raise InvalidRequest(f"a line must be a JSON object, got {type(obj).__name__}")
    return obj


def _custom_id(obj: dict) -> str:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest(f"custom_id must be a non-empty string, got {custom_id!r}")
    return custom_id


def _endpoint_and_body(obj: dict) -> tuple[str, dict]:
    """(the Request.kind its url asks for, the request body)."""
    method = obj.get("method", "POST")
    if method != "POST":
        raise InvalidRequest(f"method must be POST, got {method!r}")
    url = obj.get("url")
    if url not in ENDPOINTS:
        raise InvalidRequest(f"url must be one of {sorted(ENDPOINTS)}, got {url!r}", "unsupported_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    return ENDPOINTS[url], body


def check_paths(input_path: Path, output_path: Path) -> None:
    """Fail before any work starts: missing input, or an output we could not write."""
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    parent = output_path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if output_path.exists() and output_path.is_dir():
        raise IsADirectoryError(f"output path {output_path} is a directory")
    try:
        open(output_path, "a").close()  # creates it if missing; proves we may write there
    except OSError as e:
        raise PermissionError(f"cannot write output file {output_path}: {e.strerror}") from e
