"""Which KV blocks a sliding-window model never reads again (no torch: the router uses it too).

A layer with window W lets the query at position p see keys p - W < j <= p. When every layer has a
window (Mistral, Phi-3, Qwen2 with every layer sliding; `kv_window` = the widest), a query at p or
later never reads a key before p - W + 1, so the blocks wholly before it are dead:

    positions   0 ........ BS-1 | BS ....... 2BS-1 | 2BS ...... p-W+1 ...... p
    blocks      [    dead      ] [     dead       ] [ live (partly) ......... ]
                blocks_before_window(p, W, BS) = (p - W + 1) // BS  (here 2)

At reservation p is the prompt's length (the first decode step's position): those prompt blocks are
neither held on the decode worker nor sent by the prefill worker. As decoding moves on, the decode
worker frees the blocks that fall out (their table entries become NO_BLOCK). A model with any global
layer (Gemma 2/3) has kv_window None: every block stays.
"""

from __future__ import annotations

NO_BLOCK = -1  # a block-table entry the request does not hold (never read: before every layer's window)


def blocks_before_window(position: int, window: int | None, block_size: int) -> int:
    """Leading blocks no query at `position` or later reads (0 without a window everywhere)."""
    if window is None:
        return 0
    return max(0, (position - window + 1) // block_size)


def reserved_blocks(prompt_tokens: int, max_tokens: int, window: int | None, block_size: int) -> int:
    """Blocks a decode worker holds for a request at reservation: prompt + max_tokens, less the prompt
    blocks before the window of its first decode step (what the router's mirror counts)."""
    total = -(-(prompt_tokens + max_tokens) // block_size)
    return total - blocks_before_window(prompt_tokens, window, block_size)
