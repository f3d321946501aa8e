"""Options of ABQ block calibration (`method="abq"`), validated once, up front.

Defaults follow the ABQ-LLM reference (AdamW, fp32, LWC lr 1e-2, smoothing lr 5e-3,
compensation in the first 3 and last 4 blocks, 20 epochs, 40 at 2 bits), except the
compensation lr (1e-3, not 1e-2: see `comp_lr`).
``{"preset": "cpu"}`` starts from a cheaper setting for benchmarks on a CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    # a few epochs are most of the gain on small models; keeps SmolLM2 runs under an hour
    "cpu": {"epochs": 2},
}


@dataclass(frozen=True)
class ABQOptions:
    epochs: int = 0  # 0: 20, or 40 at 2-bit weights (the reference schedule)
    batch_size: int = 1  # calibration windows per optimisation step
    lwc_lr: float = 1e-2  # learnable weight clipping
    smooth_lr: float = 5e-3  # learnable smoothing scales
    # down_proj rank-1 compensation. The reference uses 1e-2; with Adam every entry of a bᵀ
    # then moves ~1e-2 per step, half a typical weight (std ~0.02), and short schedules
    # diverged on our models (block loss rising above RTN's); 1e-3 trains steadily.
    comp_lr: float = 1e-3
    lwc_init: float = 4.0  # sigmoid(4.0) ~ 0.982 of the min/max range to start
    learn_smooth: bool = True
    compensation: bool = True
    comp_first: int = 3  # compensate down_proj in the first `comp_first` blocks ...
    comp_last: int = 4  # ... and in the last `comp_last` blocks
    dlc: bool = True  # double log-cosine loss (off: the two MSE terms alone)
    akl: bool = True  # attention-map symmetric KL loss
    mse: bool = True  # the reference's two MSE terms beside DLC
    seed: int = 2
    # keep RTN on the block's (smoothed) weights where the start and the trained state both
    # lose to it (a short schedule may not recover from the initial clipping); one more pass
    # over the block's samples
    rtn_fallback: bool = True

    def __post_init__(self):
        for name in ("epochs", "comp_first", "comp_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"abq_options {name}={v!r} is not allowed; use an integer >= 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"abq_options batch_size={self.batch_size!r} is not allowed; "
                              "use a positive integer")
        for name in ("lwc_lr", "smooth_lr", "comp_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"abq_options {name}={v!r} is not allowed; use a number in [0, 1)")
        if not self.dlc and not self.mse:
            raise ConfigError("abq_options dlc=False and mse=False leave no output loss; "
                              "keep at least one of them")

    def epochs_for(self, wbits: int) -> int:
        return self.epochs or (40 if wbits <= 2 else 20)

    def compensated(self, block: int, n_blocks: int) -> bool:
        return self.compensation and (block < self.comp_first or block >= n_blocks - self.comp_last)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ABQOptions":
        options = dict(options or {})
        preset = options.pop("preset", "reference")
        if preset not in PRESETS:
            raise ConfigError(f"abq_options preset={preset!r} is unknown; use one of {list(PRESETS)}")
        options = {**PRESETS[preset], **options}
        allowed = [f.name for f in dataclasses.fields(cls)] + ["preset"]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown abq option(s) {unknown}; allowed: {allowed}")
        return cls(**options)
