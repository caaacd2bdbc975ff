"""Where each request's cached prefix sits in SGLang's radix cache, read on the host.

Requests that reuse a cached prefix share its KV slots node by node, so the slots two requests
share are those of their common path from the root. The GPU backend groups requests for the
cascade's shared level from these paths (sgl_longspec.attention.cascade.shared_path_groups)
instead of comparing slot ids, which live on the device.
"""

from __future__ import annotations


def radix_path(node) -> tuple[tuple[int, int], ...]:
    """Root-first (node id, KV slots from the root to the node's end) of the path ending at
    `node` (a request's `last_node`: its prompt as the tree holds it); () for none. The lengths
    are the nodes' value lengths (metadata of device tensors: nothing is read back)."""
    nodes = []
    while node is not None and node.parent is not None:  # the root holds no tokens
        nodes.append(node)
        node = node.parent
    path, end = [], 0
    for n in reversed(nodes):
        end += len(n.value) if n.value is not None else len(n.key)
        path.append((n.id, end))
    return tuple(path)
