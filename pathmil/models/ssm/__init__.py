"""Selective state-space scans for Mamba: a pure-PyTorch backend and the mamba-ssm CUDA kernels."""
