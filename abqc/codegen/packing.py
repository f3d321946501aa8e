"""Bit-plane and lookup-table packing: the data layouts the integer kernels read.

Weights are packed once, offline; activations online (after per-token quantization).
K is zero-padded to whole 64-bit words (and whole groups): a zero code contributes
nothing to any popcount, table entry or row sum, so padding never changes a result.
Bit t of word w of a plane holds element ``64 w + t`` (little-endian), for X and W alike.
"""
from __future__ import annotations

import torch

WORD = 64
#: activations per table lookup in the lookup-table kernels (16-entry tables)
TABLE_GROUP = 4


def padded_k(k: int, group_size: int = 0) -> int:
    """K rounded up to whole words, and to whole groups when grouped."""
    unit = group_size if group_size else WORD
    if group_size and group_size % WORD:
        raise ValueError(f"group_size={group_size} is not a multiple of {WORD}; kernels need "
                         "word-aligned groups")
    return -(-k // unit) * unit


def _planes(codes: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """[bits, R, kp] uint8 0/1 planes of `codes` [R, K] zero-padded to kp."""
    codes = torch.as_tensor(codes).to(torch.uint8)
    if codes.shape[-1] < kp:
        codes = torch.nn.functional.pad(codes, (0, kp - codes.shape[-1]))
    shifts = torch.arange(bits, dtype=torch.uint8).view(bits, 1, 1)
    return (codes.unsqueeze(0) >> shifts) & 1


def pack_bitplanes(codes: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Codes [R, K] (ints in [0, 2^bits)) -> int64 bit planes [bits, R, KW], KW = padded K / 64."""
    r, k = codes.shape
    kp = padded_k(k, group_size)
    planes = _planes(codes, bits, kp).view(bits, r, kp // 8, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).view(1, 1, 1, 8)
    packed = (planes.to(torch.int32) * weights).sum(-1).to(torch.uint8)  # little-endian bytes
    return packed.contiguous().view(torch.int64).view(bits, r, kp // WORD)


def unpack_bitplanes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_bitplanes`: int64 [bits, R, KW] -> codes int32 [R, k]."""
    bits, r, kw = planes.shape
    by = planes.contiguous().view(torch.uint8).view(bits, r, kw * 8, 1)
    b = (by >> torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8)) & 1
    b = b.view(bits, r, kw * WORD)[..., :k].to(torch.int32)
    return (b << torch.arange(bits, dtype=torch.int32).view(bits, 1, 1)).sum(0)


def pack_nibbles(codes: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Codes [R, K] -> uint8 table indices [bits, R, KP/4]: bit t of index kk of plane j is
    bit j of ``codes[r, 4 kk + t]``."""
    r, k = codes.shape
    kp = padded_k(k, group_size)
    planes = _planes(codes, bits, kp).view(bits, r, kp // TABLE_GROUP, TABLE_GROUP)
    weights = (1 << torch.arange(TABLE_GROUP, dtype=torch.uint8)).view(1, 1, 1, TABLE_GROUP)
    return (planes * weights).sum(-1, dtype=torch.uint8).contiguous()


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [bits, R, KP/4] -> codes int32 [R, k]."""
    bits, r, kk = packed.shape
    t = torch.arange(TABLE_GROUP, dtype=torch.uint8, device=packed.device).view(1, 1, 1, TABLE_GROUP)
    b = ((packed.unsqueeze(-1) >> t) & 1).view(bits, r, kk * TABLE_GROUP)[..., :k].to(torch.int32)
    return (b << torch.arange(bits, dtype=torch.int32, device=packed.device).view(bits, 1, 1)).sum(0)


def subset_matrix(dtype=torch.float32) -> torch.Tensor:
    """S [4, 16]: S[t, idx] = bit t of idx, so ``x_group @ S`` is every subset sum."""
    idx = torch.arange(1 << TABLE_GROUP)
    return ((idx.view(1, -1) >> torch.arange(TABLE_GROUP).view(-1, 1)) & 1).to(dtype)


def lookup_tables(x: torch.Tensor, kp: int, dtype=torch.int16) -> torch.Tensor:
    """Activation rows [M, K] -> tables [M, KP/4, 16] of subset sums of each group of 4.

    Integer codes of up to 8 bits give sums <= 4 * 255: int16 tables are exact.
    Float activations (weight-only kernels) use float32 tables.
    """
    m, k = x.shape
    if k < kp:
        x = torch.nn.functional.pad(x, (0, kp - k))
    xg = x.view(m, kp // TABLE_GROUP, TABLE_GROUP)
    if dtype.is_floating_point:
        return (xg.float() @ subset_matrix(torch.float32)).to(dtype).contiguous()
    return (xg.to(torch.int32) @ subset_matrix(torch.int32)).to(dtype).contiguous()


def group_sums(codes: torch.Tensor, group_size: int, kp: int) -> torch.Tensor:
    """Row sums per group: [R, K] -> int32 [R, G] (one group when per-channel)."""
    r, k = codes.shape
    c = codes.to(torch.int32)
    if k < kp:
        c = torch.nn.functional.pad(c, (0, kp - k))
    g = kp // group_size if group_size else 1
    return c.view(r, g, -1).sum(-1, dtype=torch.int32)
