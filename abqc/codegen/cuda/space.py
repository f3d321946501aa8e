"""CUDA schedule parameters, the tuner's search space, and a static resource estimate.

A kernel computes a bit-expanded tile: rows are (activation plane, token) pairs, columns
(weight plane, output) pairs, in 8x8 MMA tiles spread over warps. The estimate here lets
the search space drop configurations that cannot launch (shared memory, threads) before
anything is compiled; the real register count comes from ``nvcc --resource-usage``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MMA_M = MMA_N = 8
MMA_KW = 4  # 32-bit words per m8n8k128 step
WORD_BITS = 32

#: per-architecture limits used to filter configurations (and checked against nvcc's report)
ARCH_LIMITS = {
    "sm_80": {"smem_per_block": 163 * 1024, "regs_per_thread": 255, "threads_per_block": 1024},
    "sm_86": {"smem_per_block": 99 * 1024, "regs_per_thread": 255, "threads_per_block": 1024},
    "sm_89": {"smem_per_block": 99 * 1024, "regs_per_thread": 255, "threads_per_block": 1024},
    "sm_90": {"smem_per_block": 227 * 1024, "regs_per_thread": 255, "threads_per_block": 1024},
}
#: static (non-opt-in) shared memory per block: kernels above this need a dynamic-smem launch
STATIC_SMEM_LIMIT = 48 * 1024
DECODE_MAX_M = 8
#: accumulator registers per thread a candidate may use (the rest: fragments, addresses)
MAX_ACC_REGS = 96
OUT_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class CudaProblem:
    """One linear on the GPU: N outputs, K inputs, bit widths; ``decode_m`` 1..8 selects the
    decode kernel for exactly that many tokens (activation planes fill the MMA rows), 0 the
    GEMM kernel (any token count, padded to the M tile)."""

    n: int
    k: int
    wbits: int
    abits: int
    decode_m: int = 0
    out_dtype: str = "float32"

    def __post_init__(self):
        for name in ("wbits", "abits"):
            v = getattr(self, name)
            if not 1 <= v <= 8:
                raise ValueError(f"{name}={v} is not supported by the CUDA kernels; allowed 1..8")
        if self.n < 1 or self.k < 1:
            raise ValueError(f"n={self.n}, k={self.k}: both must be >= 1")
        if not 0 <= self.decode_m <= DECODE_MAX_M:
            raise ValueError(f"decode_m={self.decode_m} is not in 0..{DECODE_MAX_M} "
                             "(0: GEMM kernel)")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype={self.out_dtype!r} is not one of {OUT_DTYPES}")

    @property
    def decode_rows(self) -> int:
        """MMA rows of the decode kernel: abits * M rounded up to whole 8-row tiles."""
        return -(-self.abits * self.decode_m // MMA_M) * MMA_M


@dataclass(frozen=True)
class CudaSchedule:
    """Tile / warp / pipeline parameters (what the tuner searches and the log records).

    bm: tokens per block (GEMM; multiple of 8; ignored by decode kernels);
    bn: outputs per block (multiple of 8);
    warps_m x warps_n: warps over the block's 8x8 row x column tiles;
    bk: 32-bit words of K per pipeline stage (multiple of 4: one MMA K step is 4 words);
    stages: shared-memory buffers in flight (>1: cp.async multi-stage pipeline).
    """

    bm: int = 8
    bn: int = 32
    warps_m: int = 1
    warps_n: int = 4
    bk: int = 8
    stages: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


def tile_rows(p: CudaProblem, s: CudaSchedule) -> tuple[int, int]:
    """(planes in the block's X tile, rows per plane): GEMM (abits, bm); decode (1, rows)."""
    return (1, p.decode_rows) if p.decode_m else (p.abits, s.bm)


def check(p: CudaProblem, s: CudaSchedule) -> None:
    """Raise ValueError naming the first parameter that does not fit the problem."""
    if s.bn % MMA_N or s.bn <= 0:
        raise ValueError(f"bn={s.bn} must be a positive multiple of {MMA_N}")
    if not p.decode_m and (s.bm % MMA_M or s.bm <= 0):
        raise ValueError(f"bm={s.bm} must be a positive multiple of {MMA_M}")
    if s.bk % MMA_KW or s.bk <= 0:
        raise ValueError(f"bk={s.bk} must be a positive multiple of {MMA_KW} words")
    if s.stages not in (1, 2, 3, 4):
        raise ValueError(f"stages={s.stages} is not one of 1..4")
    planes, rows = tile_rows(p, s)
    row_tiles, col_tiles = planes * rows // MMA_M, p.wbits * s.bn // MMA_N
    if s.warps_m < 1 or row_tiles % s.warps_m:
        raise ValueError(f"warps_m={s.warps_m} does not divide the {row_tiles} row tiles "
                         f"(abits={p.abits}, rows={rows})")
    if s.warps_n < 1 or col_tiles % s.warps_n:
        raise ValueError(f"warps_n={s.warps_n} does not divide the {col_tiles} column tiles "
                         f"(wbits={p.wbits}, bn={s.bn})")


def kw_words(p: CudaProblem, s: CudaSchedule) -> int:
    """K in 32-bit words, zero-padded to whole pipeline stages."""
    return -(-p.k // (WORD_BITS * s.bk)) * s.bk


def n_padded(p: CudaProblem, s: CudaSchedule) -> int:
    return -(-p.n // s.bn) * s.bn


def smem_row_words(bk: int) -> int:
    """Words per shared-memory row of a stage. A fragment load reads 8 rows x 4 words; with
    rows padded by 4 words (16 bytes, so cp.async stays aligned) when bk is a multiple of 8,
    the 32 lanes hit 32 different banks (bk=8 unpadded: 2-way, bk=16: 4-way conflicts)."""
    return bk + 4 if bk % 8 == 0 else bk


def smem_bytes(p: CudaProblem, s: CudaSchedule) -> int:
    """Shared memory: X and W stages plus the int32 bit-pair partial products."""
    planes, rows = tile_rows(p, s)
    stage = (planes * rows + p.wbits * s.bn) * smem_row_words(s.bk) * 4
    partial = planes * rows * p.wbits * s.bn * 4
    return s.stages * stage + partial


def accumulator_regs(p: CudaProblem, s: CudaSchedule) -> int:
    """int32 accumulator registers per thread (2 per 8x8 tile a warp owns)."""
    planes, rows = tile_rows(p, s)
    return (planes * rows // MMA_M // s.warps_m) * (p.wbits * s.bn // MMA_N // s.warps_n) * 2


def fits(p: CudaProblem, s: CudaSchedule, arch: str = "sm_80", static_smem: bool = True) -> bool:
    try:
        check(p, s)
    except ValueError:
        return False
    lim = ARCH_LIMITS[arch]
    smem_cap = min(lim["smem_per_block"], STATIC_SMEM_LIMIT) if static_smem else lim["smem_per_block"]
    return (smem_bytes(p, s) <= smem_cap and s.threads <= lim["threads_per_block"]
            and accumulator_regs(p, s) <= MAX_ACC_REGS)


#: thread blocks wanted in the grid (about two per SM of an A100/H100) before larger tiles win
TARGET_BLOCKS = 264


def grid_blocks(p: CudaProblem, s: CudaSchedule, m: int) -> int:
    m_blocks = 1 if p.decode_m else -(-m // s.bm)
    return m_blocks * -(-p.n // s.bn)


def candidates(p: CudaProblem, arch: str = "sm_80", limit: int = 24, m: int = 128) -> list[CudaSchedule]:
    """A small search space: tiles x warp splits x K stage x pipeline depth, filtered by
    `fits`, ordered so the first entry is a sensible untuned default: a grid that fills the
    GPU first (decode GEMVs need narrow N tiles), then more warps, deeper pipelines, longer
    K stages. `m` is the token count the GEMM kernel is tuned for (decode: ``decode_m``)."""
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCH_LIMITS)}")
    out = []
    bms = (8,) if p.decode_m else (8, 16, 32)
    for bn in (8, 16, 32, 64):
        if bn > max(8, -(-p.n // 8) * 8):
            continue
        for bm in bms:
            for wm in range(1, 9):
                for wn in range(1, 9):
                    if wm * wn > 8:
                        continue
                    for bk in (4, 8, 16):
                        for stages in (1, 2, 3):
                            s = CudaSchedule(bm, bn, wm, wn, bk, stages)
                            if fits(p, s, arch):
                                out.append(s)
    out.sort(key=lambda s: (-min(grid_blocks(p, s, m), TARGET_BLOCKS), -min(s.threads, 256),
                            -s.stages, -s.bk, -s.bn, -s.bm))
    if not out:
        raise ValueError(f"no CUDA schedule fits {p} on {arch}")
    return out[:limit]


def default(p: CudaProblem, arch: str = "sm_80", m: int = 128) -> CudaSchedule:
    return candidates(p, arch, limit=1, m=m)[0]
