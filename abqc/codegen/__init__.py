"""CPU kernels generated with TVM TensorIR: packing -> compute -> schedule -> build -> tuning.

`tuning.kernel_for(shape, m)` is the entry point: the best known kernel for a linear of
that shape and bit widths, tuned once and compiled once per machine. GPU kernels (binary
tensor cores, same packing and epilogue) live in `abqc.codegen.cuda`;
`cuda.runtime.kernel_for(shape, m, device)` picks CPU or CUDA kernels by device.
"""
