"""A deterministic offline workload: real English prompts of mixed lengths through the chat template.

Prompt lengths are log-uniform in [min_prompt, max_prompt] tokens (after the
chat template), output lengths uniform in [min_output, max_output]; the
same seed gives the same requests, token for token.
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
    prompt_lengths: str = "loguniform"  # or "uniform"


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


def make_workload(spec: WorkloadSpec, tokenizer: Any) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    words = CORPUS.read_text().split()
    requests = []
    for i in range(spec.num_requests):
        if spec.prompt_lengths == "uniform":
            target = rng.randint(spec.min_prompt, spec.max_prompt)
        else:
            target = int(round(math.exp(rng.uniform(math.log(spec.min_prompt), math.log(spec.max_prompt)))))
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


def write_batch(requests: list[BenchRequest], path: Path, model_name: str) -> Path:
    """The workload as an OpenAI batch file: greedy, EOS ignored, per-request max_tokens."""
    with open(path, "w") as f:
        for r in requests:
            body = {"model": model_name, "messages": list(r.messages), "max_tokens": r.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": r.custom_id, "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return path
