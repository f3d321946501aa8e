"""Block-sequential calibration: cache block inputs, collect X Xᵀ per linear, solve,
feed the quantized block's outputs to the next block."""
