"""Counter-based seeds: a view key hashes to a 64-bit seed, a seed to uniform streams.

Everything here is integer arithmetic on int64 tensors (uint64 bit patterns, wrapping
like C's uint64), so the same key gives the same bits on any device and in any batch.
The exact derivation is part of the store format (docs/views.md, SEED_FORMAT_VERSION).
"""

import torch

from kdcache.errors import KdcacheError

SEED_FORMAT_VERSION = 1

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The int64 whose bit pattern is `value` mod 2**64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of uint64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele, Lea, Flood 2014) on int64 tensors."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def key_prefix(store_seed: int, round: int, slot: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hash state after (store_seed, round, slot): an int64 scalar on `device`.

    A training step passes it as a tensor, so a compiled step serves every round."""
    for name, value in (("round", round), ("slot", slot)):
        if not isinstance(value, int) or value < 0:
            raise KdcacheError(f"view {name} must be a non-negative integer, got {value!r}")
    if not isinstance(store_seed, int):
        raise KdcacheError(f"store seed must be an integer, got {store_seed!r}")
    h = torch.zeros((), dtype=torch.int64, device=device)
    for part in (store_seed, round, slot):
        h = mix64(h + _as_int64(part) + GAMMA)
    return h


def seeds_from_prefix(prefix: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """64-bit seeds of the views (prefix's key, index) for each index."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    return mix64(prefix + indices.to(torch.int64) + GAMMA)


def view_seeds(store_seed: int, round: int, slot: int, indices: torch.Tensor) -> torch.Tensor:
    """64-bit seeds of the views (store_seed, round, slot, index) for each index.

    h = 0; for x in (store_seed, round, slot, index): h = mix64(h + x + GAMMA).
    """
    return seeds_from_prefix(key_prefix(store_seed, round, slot, indices.device), indices)


def uniform_streams(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """float64 [B, count] in [0, 1): stream k is splitmix64 output k+1 from state `seed`.

    Output k = mix64(seed + (k + 1) * GAMMA); its top 53 bits / 2**53 is exact in
    float64, so every device gives the same values. The states are built by adding
    GAMMA `count` times, as splitmix64 does: torch.compile turns `arange * GAMMA` (or a
    cumsum of it) into an index expression that it evaluates without wraparound, and fails.
    """
    if count == 0:
        return torch.zeros(seeds.shape[0], 0, dtype=torch.float64, device=seeds.device)
    state, states = seeds.to(torch.int64), []
    for _ in range(count):
        state = state + GAMMA
        states.append(state)
    bits = mix64(torch.stack(states, dim=1))
    return _shr(bits, 11).to(torch.float64) * 2.0**-53
