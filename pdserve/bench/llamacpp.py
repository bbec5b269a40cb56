"""llama.cpp as a baseline for `pdserve bench quant --llamacpp`: the same GGUF, decoded by llama.cpp.

llama-cpp-python is not a dependency (it builds llama.cpp from source: ~20 min on 2 cores); install
it to get this row. Greedy decode at batch 1 from the same prompt ids, timed like pdserve's rows:
process CPU time when both run one thread (llama.cpp may compute on a thread of its own; at one thread
it computes on the calling thread: its process and thread CPU time measured equal on the Zen 4 machine,
so it is on the same clock as pdserve's rows), the prompt's prefill outside the timing. The time includes
llama-cpp-python's wrapper per token (copying the logits row), as pdserve's includes its Python.
"""

from __future__ import annotations

import time
from pathlib import Path


def available() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def decode_rates(gguf: Path, prompt: list[int], steps: int, repeats: int, threads: int) -> list[float]:
    """Batch-1 greedy decode tok/s, one figure per repeat (after one warm-up step), as bench quant's own."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + (1 + steps) * repeats + 8, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    llm.eval(prompt)

    def step() -> None:
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    step()
    clock = time.process_time if threads == 1 else time.perf_counter
    rates = []
    for _ in range(repeats):
        t = clock()
        for _ in range(steps):
            step()
        rates.append(steps / (clock() - t))
    return rates
