"""The flags several commands share (engine, cluster, SLOs) and the configs built from them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from engine.config import DTYPE_CHOICES, QUANTIZATIONS, EngineConfig
from proto.kinds import TRANSPORT_NAMES, Mode, Transport

if TYPE_CHECKING:
    from pdserve.observability.metrics import SLO
    from pdserve.runtime.cluster import ClusterConfig
    from router.hybrid_rule import HybridRule
    from router.router import RouterConfig


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="an HF folder, a .gguf file, or omit for the default SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else float32")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA on workers that have a GPU, else CPU")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool size per decode worker")
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="KV cache storage: auto (the model's dtype) or int8 (per-token-per-head scales: "
                        "~1.9x the blocks of bf16 in the same --kv-cache-gib, half the bytes moved)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="decode batch limit")
    g.add_argument("--max-prefill-tokens", type=int, default=2048, help="prefill batch token budget")
    g.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    g.add_argument("--speculative", default="off",
                   help="speculative decoding: off, ngram (prompt lookup), layers:K (the target's first K layers) "
                        "or model:PATH (a smaller model sharing the tokenizer)")
    g.add_argument("--num-speculative-tokens", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="draft tokens per step (γ), or auto: chosen each step from measured costs and acceptance")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "cpu", "triton"),
                   help="auto: Triton kernels on CUDA, the native kernel on a CPU; torch: the reference path")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed (prefill) or held (decode)")
    g.add_argument("--prefill-cache-gib", type=float, default=0.5,
                   help="each prefill worker's prefix-cache pool (with --enable-prefix-caching)")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="quantize linear-layer weights at load (int8 symmetric, int4 asymmetric, group-wise; "
                        "w8a8: int8 weights and int8 activations per token, an int8 GEMM; "
                        "gguf: keep a GGUF's own Q4_0/Q4_1/Q8_0 blocks)")
    g.add_argument("--quant-group-size", type=int, default=0,
                   help="inputs per quantization scale; 0: int8 one per output channel, int4 32")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head")
    g.add_argument("--model-impl", default="auto", choices=("auto", "native", "transformers"),
                   help="auto: pdserve's own forward where it has one, else transformers' modules over the paged KV "
                        "cache (slower); transformers: always the latter (the start-up log says which ran)")


AUTO_MODE = "auto"


def cluster_args(p: argparse.ArgumentParser, offline: bool = False) -> None:
    """`offline` (run-batch, bench throughput): --mode defaults to auto (runtime/offline_mode.py)."""
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None,
                   help="Ray cluster: omit to start a local one, 'auto' to join the running one, or ray://host:port")
    auto = (f"; {AUTO_MODE} (the default): the mode measured faster offline on one CPU node there (a local "
            "cluster on the CPU), pd elsewhere, said in the log") if offline else ""
    g.add_argument("--mode", default=AUTO_MODE if offline else Mode.PD.value,
                   choices=(*Mode.words(), AUTO_MODE) if offline else Mode.words(),
                   help="pd: prefill and decode workers, KV sent between them; colocated: workers that each "
                        "prefill (chunked, mixed into decode steps) and decode, the non-disaggregated baseline; "
                        "hybrid: prefill workers take long prompts, decode workers chunk-prefill short ones"
                        + auto)
    g.add_argument("--hybrid-threshold", type=int, default=None,
                   help="--mode hybrid: uncached prompt tokens up to which a prompt is chunk-prefilled on its decode "
                        "worker below saturation (default: the rule `pdserve plan` prints, 512/256/0 by load)")
    g.add_argument("--prefill-workers", type=int, default=1)
    g.add_argument("--decode-workers", type=int, default=1)
    g.add_argument("--colocated-workers", type=int, default=1,
                   help="--mode colocated: workers that prefill and decode (they take the --decode-* resources)")
    g.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="--mode colocated: tokens per step, decode rows plus prefill chunks (0: 512 on a CPU, "
                        "2048 on CUDA; at least --max-num-seqs)")
    g.add_argument("--transport", default=Transport.AUTO.value, choices=TRANSPORT_NAMES,
                   help="KV transport; auto: shared memory on the same node, gRPC across nodes")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="tensor parallel ranks of every worker (vLLM's name; colocated workers and serve use it); "
                        "--prefill-tp / --decode-tp set each phase's own")
    g.add_argument("--prefill-tp", type=int, default=0,
                   help="tensor parallel ranks per prefill worker, one process each on one node (0: "
                        "--tensor-parallel-size)")
    g.add_argument("--decode-tp", type=int, default=0,
                   help="tensor parallel ranks per decode (or colocated) worker (0: --tensor-parallel-size)")
    g.add_argument("--prefill-threads", type=int, default=0, help="torch threads per prefill worker (0: auto)")
    g.add_argument("--decode-threads", type=int, default=0, help="torch threads per decode worker (0: auto)")
    g.add_argument("--transfer-timeout", type=float, default=60.0, help="deadline of one request's KV transfer (s)")
    g.add_argument("--call-timeout", type=float, default=120.0,
                   help="deadline of any one call to a worker (s); past it the worker is restarted")
    g.add_argument("--stall-timeout", type=float, default=60.0,
                   help="a decode worker whose loop has not turned for this long is restarted (s)")
    g.add_argument("--batch-admissions", default="auto", choices=("auto", "on", "off"),
                   help="hold prefilled requests until prefill is idle, then start decoding them together: fewer, "
                        "fuller decode steps when prefill and decode share CPU cores, at the cost of each "
                        "request's wait for decode. auto: on for run-batch, bench throughput and `up` deployments "
                        "when all workers share one CPU node; off for serve and bench serve (every request's "
                        "TPOT counts). serve --deployment uses what `up` was given")
    for role in ("prefill", "decode"):
        g.add_argument(f"--{role}-cpus", type=float, default=0.0, help=f"CPUs each {role} worker reserves")
        g.add_argument(f"--{role}-gpus", type=float, default=0.0, help=f"GPUs each {role} worker reserves")
        g.add_argument(f"--{role}-resources", default="",
                       help=f"custom Ray resources per {role} worker, e.g. {role}=1 (see deploy/)")
        g.add_argument(f"--{role}-labels", default="", help=f"node labels a {role} worker needs, e.g. role={role}")
    g.add_argument("--placement-strategy", default="SPREAD", choices=("PACK", "SPREAD", "STRICT_PACK",
                                                                       "STRICT_SPREAD"))
    g.add_argument("--tls-cert", default=None, help="PEM certificate of the KV endpoints (enables TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed --tls-cert (default: the cert itself)")


def slo_args(p: argparse.ArgumentParser) -> None:
    from pdserve.observability.metrics import SLO

    g = p.add_argument_group("service-level objectives (goodput counts requests within both)")
    g.add_argument("--slo-ttft", type=float, default=SLO.ttft_s, help="time-to-first-token SLO, seconds")
    g.add_argument("--slo-tpot", type=float, default=SLO.tpot_s, help="time-per-output-token SLO, seconds")


def slo_config(args: argparse.Namespace) -> SLO:
    from pdserve.observability.metrics import SLO

    return SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)


def router_config(args: argparse.Namespace, engine: EngineConfig) -> RouterConfig:
    """A server's router (`online_router`, set by serve and bench serve) admits eagerly under auto:
    holding admissions back would delay every stream."""
    from router.router import RouterConfig

    choice = getattr(args, "batch_admissions", "auto")
    online = getattr(args, "online_router", False)
    batch = {"on": True, "off": False}.get(choice, False if online else None)  # None: the router decides
    return RouterConfig(max_prefill_tokens=engine.max_prefill_tokens, call_timeout_s=args.call_timeout,
                        stall_timeout_s=args.stall_timeout, batch_admissions=batch, hybrid_rule=hybrid_rule(args))


def hybrid_rule(args: argparse.Namespace) -> HybridRule:
    from router.hybrid_rule import HybridRule

    threshold = getattr(args, "hybrid_threshold", None)
    rule = HybridRule() if threshold is None else HybridRule.fixed(threshold)
    ttft = getattr(args, "slo_ttft", None)
    return rule if ttft is None else rule.with_slo(ttft)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    kwargs = dict(model=args.model, dtype=args.dtype, device=args.device,
                  block_size=args.block_size, kv_cache_gib=args.kv_cache_gib, kv_cache_dtype=args.kv_cache_dtype,
                  max_num_seqs=args.max_num_seqs,
                  max_prefill_tokens=args.max_prefill_tokens, enforce_eager=args.enforce_eager,
                  attention_backend=args.attention_backend, enable_prefix_caching=args.enable_prefix_caching,
                  prefill_cache_gib=args.prefill_cache_gib,
                  quantization=args.quantization, quant_group_size=args.quant_group_size,
                  quantize_lm_head=args.quantize_lm_head, speculative=args.speculative,
                  num_speculative_tokens=args.num_speculative_tokens, model_impl=args.model_impl)
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    return EngineConfig(**kwargs)


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    from pdserve.runtime.cluster import ClusterConfig, WorkerResources
    from proto.messages import TLSFiles

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca or args.tls_cert)
    roles = {role: WorkerResources.parse(getattr(args, f"{role}_cpus"), getattr(args, f"{role}_gpus"),
                                         getattr(args, f"{role}_resources"), getattr(args, f"{role}_labels"))
             for role in ("prefill", "decode")}
    if args.mode == AUTO_MODE:
        from pdserve.runtime.offline_mode import choose_offline_mode

        args.mode = choose_offline_mode(args, engine_config(args).resolved().device).value
    if args.mode != Mode.PD and getattr(args, "deployment", None):
        raise ValueError(f"--deployment serves a running deployment, which runs --mode pd; drop --mode {args.mode}")
    return ClusterConfig(address=args.address, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
                         transport=Transport(args.transport), prefill_threads=args.prefill_threads,
                         decode_threads=args.decode_threads, prefill=roles["prefill"], decode=roles["decode"],
                         placement_strategy=args.placement_strategy, transfer_timeout_s=args.transfer_timeout,
                         tls=tls, mode=Mode(args.mode), num_colocated=args.colocated_workers,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         prefill_tp=args.prefill_tp or args.tensor_parallel_size,
                         decode_tp=args.decode_tp or args.tensor_parallel_size)
