"""Deterministic offline workloads: real English prompts through the chat template.

`make_workload`: prompt lengths log-uniform in [min_prompt, max_prompt] tokens
(after the chat template), output lengths uniform in [min_output, max_output].
`make_shared_prefix_workload`: a few long system headers (a document, few-shot
examples), each followed by many short questions, interleaved: what prefix
caching is for. The same seed gives the same requests, token for token.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).with_name("corpus.txt")
INSTRUCTIONS = (
    "Continue the following text.",
    "Summarize the following passage.",
    "Rewrite the following passage in simpler words.",
    "List the main ideas of the following text.",
    "Write a short story that begins like this.",
)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    min_prompt: int = 16
    max_prompt: int = 512
    min_output: int = 16
    max_output: int = 256
    seed: int = 0
    prompt_lengths: str = "loguniform"  # or "uniform", or "bimodal": most short, `long_share` of 2-4k tokens
    long_share: float = 0.15  # bimodal: share of long prompts, uniform in long_prompt
    long_prompt: tuple[int, int] = (2048, 4096)


# nano-vllm's benchmark shape: 256 sequences, prompt and output lengths uniform in 100-1024.
NANOVLLM = WorkloadSpec(num_requests=256, min_prompt=100, max_prompt=1024, min_output=100, max_output=1024,
                        prompt_lengths="uniform")


@dataclass(frozen=True)
class BenchRequest:
    custom_id: str
    messages: tuple[dict[str, str], ...]
    prompt_ids: tuple[int, ...]
    max_tokens: int


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _prompt_target(spec: WorkloadSpec, rng: random.Random) -> int:
    """A prompt length: uniform or log-uniform in [min_prompt, max_prompt]; bimodal (`--workload bimodal`,
    issue 28): log-uniform up to max_prompt, and `long_share` of them uniform in `long_prompt`."""
    if spec.prompt_lengths == "bimodal" and rng.random() < spec.long_share:
        return rng.randint(*spec.long_prompt)
    if spec.prompt_lengths == "uniform":
        return rng.randint(spec.min_prompt, spec.max_prompt)
    return int(round(math.exp(rng.uniform(math.log(spec.min_prompt), math.log(spec.max_prompt)))))


def make_workload(spec: WorkloadSpec, tokenizer: Any) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    words = CORPUS.read_text().split()
    requests = []
    for i in range(spec.num_requests):
        target = _prompt_target(spec, rng)
        out = rng.randint(spec.min_output, spec.max_output)
        instruction = rng.choice(INSTRUCTIONS)
        start = rng.randrange(len(words))
        stream = words[start:] + words + words  # wrap around the corpus

        def messages_for(n: int, instruction: str = instruction, stream: list[str] = stream) -> list[dict[str, str]]:
            text = instruction if n == 0 else instruction + "\n\n" + " ".join(stream[:n])
            return [{"role": "user", "content": text}]

        lo, hi = 0, 1
        while len(_chat_ids(tokenizer, messages_for(hi))) < target:
            lo, hi = hi, hi * 2
        while lo < hi:  # fewest words whose prompt reaches the target length
            mid = (lo + hi) // 2
            if len(_chat_ids(tokenizer, messages_for(mid))) < target:
                lo = mid + 1
            else:
                hi = mid
        messages = messages_for(lo)
        requests.append(BenchRequest(f"bench-{i}", tuple(messages), tuple(_chat_ids(tokenizer, messages)), out))
    return requests


@dataclass(frozen=True)
class SharedPrefixSpec:
    num_headers: int = 4
    header_tokens: int = 1000  # each header's length in tokens (the system message)
    questions_per_header: int = 64
    min_output: int = 8
    max_output: int = 32
    seed: int = 0


QUESTIONS = ("What does the passage say about {w}?", "Explain the role of {w} in the text above.",
             "Quote the sentence that mentions {w}.", "Is {w} important here? Answer briefly.",
             "Summarize what the document says about {w} in one line.")


def make_shared_prefix_workload(spec: SharedPrefixSpec, tokenizer: Any) -> list[BenchRequest]:
    """num_headers x questions_per_header requests: header h as the system message, a short question
    as the user message; requests of different headers are interleaved (seeded shuffle)."""
    rng = random.Random(spec.seed)
    words = CORPUS.read_text().split()
    requests = []
    for h in range(spec.num_headers):
        start = rng.randrange(len(words))
        stream = words[start:] + words + words
        header = _header_text(tokenizer, stream, spec.header_tokens)
        for q in range(spec.questions_per_header):
            question = rng.choice(QUESTIONS).format(w=rng.choice(stream[:2000]).strip(".,;:!?\"'()"))
            messages = [{"role": "system", "content": header}, {"role": "user", "content": question}]
            requests.append(BenchRequest(f"shared-{h}-{q}", tuple(messages), tuple(_chat_ids(tokenizer, messages)),
                                         rng.randint(spec.min_output, spec.max_output)))
    rng.shuffle(requests)
    return requests


def _header_text(tokenizer: Any, stream: list[str], tokens: int) -> str:
    """The fewest leading words of `stream` that take at least `tokens` tokens."""
    lo, hi = 1, max(2, tokens)
    while len(tokenizer(" ".join(stream[:hi]))["input_ids"]) < tokens:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(stream[:mid]))["input_ids"]) < tokens:
            lo = mid + 1
        else:
            hi = mid
    return " ".join(stream[:lo])


def write_batch(requests: list[BenchRequest], path: Path, model_name: str) -> Path:
    """The workload as an OpenAI batch file: greedy, EOS ignored, per-request max_tokens."""
    with open(path, "w") as f:
        for r in requests:
            body = {"model": model_name, "messages": list(r.messages), "max_tokens": r.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": r.custom_id, "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return path
