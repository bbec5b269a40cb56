"""Prefix-cache keys: a full block of tokens is named by a hash chain over everything before it.

    key[i] = blake2b(key[i-1] | salt | token_ids[i*BS:(i+1)*BS])        key[-1] = b""

Two requests whose first n full blocks hold the same tokens (under the same model: the salt is its
fingerprint) get the same first n keys, so a block's KV can be shared by key. Only full blocks have
keys: a partial last block is still being filled and is never shared.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

BlockKey = bytes  # 16-byte digest


def block_keys(token_ids: list[int] | tuple[int, ...], block_size: int, salt: str = "",
               max_blocks: int | None = None) -> list[BlockKey]:
    """Keys of the leading full blocks of `token_ids` (at most `max_blocks`)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    keys: list[BlockKey] = []
    parent = salt.encode()
    for i in range(n):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class KVEvents:
    """Keys a worker holds now but did not at its last report (`stored`), and the reverse (`removed`).
    A key is in at most one list, so the order of applying them does not matter."""

    stored: list[BlockKey] = field(default_factory=list)
    removed: list[BlockKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed)
