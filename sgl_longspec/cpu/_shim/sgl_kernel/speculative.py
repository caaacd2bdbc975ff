from sgl_longspec.cpu.ops import reconstruct_indices_from_tree_mask  # noqa: F401
