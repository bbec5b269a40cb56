"""Attention: one backend interface for prefill, extend and decode (base.py), its implementations
(torch reference, native CPU decode, Triton on CUDA) and the per-forward contexts the model calls."""

from engine.attention.base import AttentionBackend, AttentionSpec, VarlenBatch
from engine.attention.contexts import ExtendAttention, KVSink, PagedDecodeAttention, PrefillAttention
from engine.attention.registry import BACKENDS, get_backend
from engine.attention.torch_ref import TorchBackend, torch_paged_decode

__all__ = ["BACKENDS", "AttentionBackend", "AttentionSpec", "ExtendAttention", "KVSink", "PagedDecodeAttention",
           "PrefillAttention", "TorchBackend", "VarlenBatch", "get_backend", "torch_paged_decode"]
