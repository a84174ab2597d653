"""Experiments built on the runner: the parity protocol (parity), the GPU suite (gpu_suite) and the Triton
kernels' compile check without a GPU (kernel_check)."""
