"""Attention for the verify pass: committed prefix unmasked and draft tree masked, merged by
log-sum-exp; on CPU (PyTorch, with the cascade level over radix-shared prefixes) and on CUDA
(FlashInfer + the Triton tree kernel), registered under their own names in SGLang's registry."""
