"""The baselines, run in the benchmark's own process on the same workload:
transformers' `generate` in static batches, and transformers' continuous batching.

Both count only useful output tokens: a static batch decodes until its longest
request is done, and the tokens past each request's own max_tokens are waste.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdserve.bench.workload import BenchRequest


@dataclass
class SystemResult:
    system: str
    dtype: str
    wall_s: float
    output_tokens: int  # useful: each request's own max_tokens
    prompt_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.wall_s

    @property
    def mean_ttft_s(self) -> float:
        return sum(self.ttft_s) / max(len(self.ttft_s), 1)

    @property
    def mean_tpot_s(self) -> float:
        return sum(self.tpot_s) / max(len(self.tpot_s), 1)


def load_hf(folder: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                attn_implementation="sdpa").to(device).eval()


def hf_static(folder: Path, dtype: str, requests: list[BenchRequest], batch_size: int = 8,
              device: str = "cpu") -> SystemResult:
    """`generate` over fixed batches of `batch_size`, left-padded, greedy, EOS ignored."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = load_hf(folder, dtype, device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    result = SystemResult("hf_static", dtype, 0.0, 0, 0)
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        longest = max(r.max_tokens for r in batch)
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                                 min_new_tokens=longest, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        for i, r in enumerate(batch):
            times = clock.times[: r.max_tokens]
            result.ttft_s.append(times[0] - start)
            if len(times) > 1:
                result.tpot_s.append((times[-1] - times[0]) / (len(times) - 1))
            result.outputs[r.custom_id] = out[i, width:width + r.max_tokens].tolist()
    result.wall_s = time.perf_counter() - start
    result.output_tokens = sum(r.max_tokens for r in requests)
    result.prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    return result


def hf_continuous(folder: Path, dtype: str, requests: list[BenchRequest], timeout_s: float = 3600,
                  device: str = "cpu") -> SystemResult:
    """transformers' continuous batching manager, per-request max_new_tokens, EOS ignored."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf(folder, dtype, device)
    config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r.max_tokens for r in requests),
                              pad_token_id=model.config.pad_token_id)
    cb_config = ContinuousBatchingConfig()
    # Room for the whole workload at once, as pdserve's pool has. Left unset, transformers sizes its
    # cache to 60% of the machine's RAM on a CPU (14 GiB here), touches all of it, and is killed by
    # the OOM killer when anything else (a Ray cluster) holds memory too.
    cb_config.num_blocks = sum(-(-(len(r.prompt_ids) + r.max_tokens) // cb_config.page_size) for r in requests)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
    manager.start()
    result = SystemResult("hf_cb", dtype, 0.0, 0, 0)
    try:
        start = time.perf_counter()
        for r in requests:
            manager.add_request(list(r.prompt_ids), request_id=r.custom_id, max_new_tokens=r.max_tokens,
                                record_timestamps=True)
        pending = {r.custom_id for r in requests}
        deadline = time.time() + timeout_s
        while pending:
            if time.time() > deadline:
                raise TimeoutError(f"transformers continuous batching left {len(pending)} requests unfinished")
            out = manager.get_result(timeout=1.0)
            if out is None or not out.is_finished() or out.request_id not in pending:
                continue
            if out.error:
                raise RuntimeError(f"transformers continuous batching failed {out.request_id}: {out.error}")
            pending.discard(out.request_id)
            stamps = out.timestamps or []
            if stamps:
                result.ttft_s.append(stamps[0] - start)
                if len(stamps) > 1:
                    result.tpot_s.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            result.outputs[out.request_id] = list(out.generated_tokens)
        result.wall_s = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    result.output_tokens = sum(len(result.outputs[r.custom_id]) for r in requests)
    result.prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    return result
