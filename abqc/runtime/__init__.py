"""The runtime: quantized linears that run on the generated kernels, the model tree that
holds them (prefill, generate), and the saved format."""
