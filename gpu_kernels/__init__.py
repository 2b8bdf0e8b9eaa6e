"""GPU kernels (Triton) and their pure-torch references. Imports only torch and triton."""
