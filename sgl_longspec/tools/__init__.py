"""Offline tools around the runtime: the `sgl-longspec` command, the embedded models, and the
ShareGPT reader the benchmarks and the training data share."""
