"""Issue 26 through real workers in one process: a PrefillWorker and a DecodeWorker (tiny fp32 models,
shared memory and gRPC), driven as the router drives them.

A model whose every layer is windowed (Mistral, window 16): prompt blocks before the first decode
step's window are neither held by the decode worker nor sent (bytes asserted), the blocks the window
leaves behind are freed as decoding moves on (and reported for the router's mirror), and the greedy
tokens still equal transformers'. A model with global layers (Gemma 2, Qwen2 with one full layer)
moves its whole cache, per-layer layout and all, like any other. No block is left behind.
"""

from __future__ import annotations

import time

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig, SamplingParams
from engine.kv_window import blocks_before_window
from prefill_worker.worker import PrefillWorker
from proto.messages import Admission, PrefillTask, Reservation, WorkerConfig
from tests.conftest import WINDOW

MAX_TOKENS = 24
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPT_LENS = (7, 19, 40, 70)
BS = 4


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _reference(folder, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          eos_token_id=-1)
        out.append(gen[0, len(p):].tolist())
    return out


def _serve(folder, transport: str, prompts: list[list[int]]):
    """Reserve, prefill, admit, poll to the end; returns (grants, prefill results, outputs, released blocks,
    blocks held right after the reservations)."""
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=BS, num_threads=1,
                          kv_cache_gib=0.002, prefill_cache_gib=0.001, attention_backend="cpu")
    prefill = PrefillWorker(WorkerConfig(engine=engine, worker_id="p0", auth_token="t", transport=transport))
    decode = DecodeWorker(WorkerConfig(engine=engine, worker_id="d0", auth_token="t", transport=transport))
    try:
        ids = [f"r{i}" for i in range(len(prompts))]
        grants = decode.reserve([Reservation(rid, len(p), MAX_TOKENS, tuple(p)) for rid, p in zip(ids, prompts)])
        held = decode.stats().pool.used_blocks
        tasks = [PrefillTask(rid, tuple(p), PARAMS, decode.endpoint(), grants[rid].block_table,
                             grants[rid].first_block) for rid, p in zip(ids, prompts)]
        results = {r.request_id: r for r in prefill.prefill(tasks)}
        assert all(r.error is None for r in results.values()), [r.error for r in results.values()]
        assert decode.admit([Admission(rid, len(p), results[rid].first_token, results[rid].prefill_end, PARAMS,
                                       results[rid].transport) for rid, p in zip(ids, prompts)]) == []
        outputs, released = {}, dict.fromkeys(ids, 0)
        deadline = time.time() + 120
        while len(outputs) < len(ids) or decode.stats().running:
            assert time.time() < deadline, "decode did not finish"
            poll = decode.poll(0.2)
            for res in poll.results:
                assert res.error is None
                outputs[res.request_id] = list(res.token_ids)
            for rid, n in poll.released_blocks:
                released[rid] += n
        for rid, n in decode.poll(0.0).released_blocks:
            released[rid] += n
        with decode._lock:
            decode.blocks.assert_empty()
        prefill.cache.blocks.assert_empty()
        layout = decode.endpoint().layout
        return grants, results, [outputs[rid] for rid in ids], [released[rid] for rid in ids], held, layout
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_windowed_model_sends_and_holds_only_its_window(tiny_served, transport):
    folder = tiny_served("mistral-sw")
    prompts = _prompts()
    grants, results, outputs, released, held, layout = _serve(folder, transport, prompts)
    assert outputs == _reference(folder, prompts)
    assert layout.kv_window == WINDOW
    skipped = [blocks_before_window(len(p), WINDOW, BS) for p in prompts]
    assert skipped == [0, 1, 6, 13]  # (P - 16 + 1) // 4
    for p, rid, skip in zip(prompts, ("r0", "r1", "r2", "r3"), skipped):
        grant, sent = grants[rid], len(p) - skip * BS
        assert grant.window_blocks == skip and grant.block_table[:skip] == (-1,) * skip
        assert results[rid].kv_bytes == sent * layout.bytes_per_token  # only the window's blocks travelled
    assert results["r3"].kv_bytes == 18 * layout.bytes_per_token  # 70-token prompt: 18 tokens, not 70
    # Held at reservation: prompt + max_tokens less the skipped blocks (what the router's mirror counts).
    assert held == sum(-(-(len(p) + MAX_TOKENS) // BS) - s for p, s in zip(prompts, skipped))
    # Freed as decoding moved on: after the step that made output[22] the next position is P + 22.
    assert released == [blocks_before_window(len(p) + MAX_TOKENS - 2, WINDOW, BS) - s
                        for p, s in zip(prompts, skipped)]


@pytest.mark.parametrize("name,transport", [("gemma2", "shm"), ("gemma2", "grpc"), ("qwen2-sw", "grpc"),
                                            ("gemma3", "shm")])
def test_a_model_with_global_layers_moves_its_whole_cache(tiny_served, name, transport):
    folder = tiny_served(name)
    prompts = _prompts()
    grants, results, outputs, released, _, layout = _serve(folder, transport, prompts)
    assert outputs == _reference(folder, prompts)
    assert layout.kv_window is None and any(s.window for s in layout.layers)  # local and global layers
    for p, rid in zip(prompts, ("r0", "r1", "r2", "r3")):
        assert grants[rid].window_blocks == 0
        assert results[rid].kv_bytes == len(p) * layout.bytes_per_token
    assert released == [0] * len(prompts)
