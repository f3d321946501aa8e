"""CUDA kernels on binary tensor cores (``mma.sync ... m8n8k128 ... b1.b1.s32.and.popc``).

Same bit-plane packing and dequantization epilogue as the CPU kernels (``abqc.codegen``);
one file per purpose: `space` (schedule parameters, search space, limits), `intrin` (the
registered b1 tensor intrinsics and fragment layouts), `template` (the kernel's TensorIR),
`compile` (CUDA source, nvcc/ptxas, resource checks), `runtime` (picking and calling a
kernel for tensors on a CUDA device).
"""
