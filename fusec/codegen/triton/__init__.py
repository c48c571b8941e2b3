"""The Triton backend: tile programs emitted as ``@triton.jit`` source, run by the Triton interpreter
on a CPU and through ``jax_triton.triton_call`` on a GPU."""
