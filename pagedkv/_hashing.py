"""The prefix-cache page hash: deterministic across processes, identical in both backends.

``page_hash(parent, tokens, salt)`` chains a page's tokens onto its parent page's hash (0 for the
first page) and the tenant's salt. Python's built-in ``hash`` is salted per process, so it is
not used. The C++ core implements the same arithmetic (``csrc/``); a parity test compares them.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def mix64(z: int) -> int:
    """SplitMix64's finalizer: a bijection on 64-bit ints that spreads every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def page_hash(parent: int, tokens, salt: int) -> int:
    """64-bit hash of one full page of token ids chained on its parent page's hash.

    ``h = mix(mix(parent) ^ salt)``; then for each token ``h = (h ^ token) * FNV_PRIME mod 2**64``;
    finally ``mix(h ^ len(tokens))``. Tokens are ints in ``[0, 2**31)``.
    """
    h = mix64(mix64(parent) ^ salt)
    for token in tokens:
        h = ((h ^ token) * _FNV_PRIME) & MASK64
    return mix64(h ^ len(tokens))


def salt_hash(salt: str | bytes | None) -> int:
    """The 64-bit value of a ``cache_salt``: 0 for None, FNV-1a of the (UTF-8) bytes otherwise.

    Callers pass salts already canonical (``_validate.cache_salt``: never empty).
    """
    if salt is None:
        return 0
    data = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & MASK64
    # NOTE: never 0, so that a salt always differs from no salt at all.
    return h or 1
