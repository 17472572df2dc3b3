"""GPU kernels (Triton) with plain-PyTorch references; `dispatch` picks between them."""
