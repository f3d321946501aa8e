"""Reference engines run beside abqc's benchmarks (llama.cpp), built from registry sources."""
