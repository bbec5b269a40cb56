"""The load `vllm bench serve --backend openai --endpoint /v1/completions` sends, re-implemented so that
`pdserve bench serve` can run it against any OpenAI-compatible server (pdserve's, vLLM's) without vLLM.

Request: POST {base}/v1/completions with `prompt`, `max_tokens`, `stream: true`,
`stream_options.include_usage`, `ignore_eos`, `repetition_penalty: 1.0`, `logprobs: null`. Stream: server-sent
events split on blank lines, `data: ` stripped; each event with `choices` is a token chunk (its arrival
time is the first token's, then an inter-token gap), the one with `usage` gives `completion_tokens`;
`[DONE]` ends it. Latency ends at the last chunk received, as vLLM's client counts it, so TPOT =
(latency - TTFT) / (output tokens - 1) and goodput = requests within both SLOs / benchmark duration.

The random dataset is vLLM's `--dataset-name random`: each prompt is a run of consecutive vocabulary
ids from a random offset (special tokens left out), decoded to text and cut to `--random-input-len`
tokens (lengths drawn in [len * (1 - ratio), len * (1 + ratio)], `--random-range-ratio`).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.bench.serve_sample import Sample


@dataclass(frozen=True)
class RandomDataset:
    """vLLM's `--dataset-name random` shape."""

    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--random-input-len and --random-output-len must be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.range_ratio}")

    def lengths(self, value: int, n: int, rng: np.random.Generator) -> np.ndarray:
        low, high = int(value * (1 - self.range_ratio)), int(value * (1 + self.range_ratio))
        return rng.integers(max(1, low), max(1, high) + 1, size=n)


@dataclass(frozen=True)
class PromptRequest:
    """One completion request of a load: its text and its length in the server's tokens."""

    custom_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    max_tokens: int


def random_requests(spec: RandomDataset, n: int, tokenizer: Any, seed: int, prefix: str = "") -> list[PromptRequest]:
    """`n` random prompts (seeded), each re-tokenized and cut to its drawn length."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special])
    inputs, outputs = spec.lengths(spec.input_len, n, rng), spec.lengths(spec.output_len, n, rng)
    offsets = rng.integers(0, len(allowed), size=n)
    out = []
    for i, (length, max_tokens, offset) in enumerate(zip(inputs, outputs, offsets)):
        ids = allowed[(offset + i + np.arange(length)) % len(allowed)].tolist()
        cut = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:length]
        out.append(PromptRequest(f"{prefix}{i}", tokenizer.decode(cut), tuple(cut), int(max_tokens)))
    return out


class EventSplitter:
    """Server-sent events out of a byte stream cut anywhere (vLLM's StreamedResponseHandler)."""

    def __init__(self) -> None:
        self.buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def add(self, chunk: bytes) -> list[str]:
        self.buffer += self._decoder.decode(chunk)
        messages = []
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            if message.strip():
                messages.append(message.strip())
        return messages


def _read_event(message: str, s: Sample, t0: float) -> None:
    if message.startswith(":"):  # an SSE comment (a ping)
        return
    data = message.removeprefix("data: ")
    if data == "[DONE]":
        return
    body = json.loads(data)
    if body.get("choices"):
        now = time.perf_counter() - t0
        if s.first is None:
            s.first = now
        s.end = now  # the last chunk so far: vLLM's latency ends here
    elif usage := body.get("usage"):
        s.output_tokens = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        s.cached_tokens = details.get("cached_tokens") or 0
    if "error" in body:
        s.error = str(body["error"].get("message", body["error"]))


Send = Callable[[PromptRequest, Sample, float], Awaitable[None]]


def completions_sender(base_url: str, model: str, timeout_s: float,
                       ignore_eos: bool = True) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """(send, close): send streams one request as vLLM's client does and fills its Sample (times from t0,
    a perf_counter() reading). Made on the event loop that sends."""
    import aiohttp

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                    connector=aiohttp.TCPConnector(limit=0))
    url = base_url.rstrip("/") + "/v1/completions"

    async def send(req: PromptRequest, s: Sample, t0: float) -> None:
        payload = {"model": model, "prompt": req.prompt, "repetition_penalty": 1.0, "max_tokens": req.max_tokens,
                   "logprobs": None, "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            payload["ignore_eos"] = True
        try:
            async with session.post(url, json=payload) as response:
                if response.status != 200:
                    s.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                events = EventSplitter()
                async for chunk in response.content.iter_any():
                    for message in events.add(chunk):
                        _read_event(message, s, t0)
            if s.first is None and s.error is None:
                s.error = "no token chunk received"
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            s.error = f"{type(e).__name__}: {e}"

    return send, session.close


async def served_model(base_url: str) -> str:
    """The first model a server lists (what `vllm bench serve` sends when --model names none)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(base_url.rstrip("/") + "/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]
