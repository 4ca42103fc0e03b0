"""Which requests of a batched verify step share one attention call.

Attention runs on a padded grid: every request in a call is padded to the call's largest tree (``N`` query rows)
and its longest cached prefix (``P`` key positions), so its cost is about ``B * N * (P + N)``. In a batch where most
requests verify a one-node tree (no n-gram match) and a few verify eight nodes, one call pays for ``8 x`` the
queries it needs; requests with short prompts beside long ones pay for the long prefix. Splitting the batch into
groups of similar requests removes that padding, at a fixed cost per extra call (gathers, masks, a kernel launch).

:func:`plan_groups` is that trade as a pure function: requests sorted by (tree size, prefix length), cut into
contiguous runs by dynamic programming to minimise ``sum(B_g * N_g * (P_g + N_g)) + overhead * groups``.
"""

from __future__ import annotations

from collections.abc import Sequence

# The fixed cost of one more attention call per layer, in the cost's units (query rows x key positions): a call's
# set-up (gathers, masks, a kernel launch) costs about what this many row-positions of SDPA do on a CPU
# (docs/history/05-onednn.md).
GROUP_OVERHEAD = 4096


def group_cost(nodes: Sequence[int], prefix_lens: Sequence[int], block_size: int) -> int:
    """The padded work of one attention call over these requests: ``B * N * (P + N)``, with ``P`` the longest
    prefix rounded up to whole KV blocks (what the gather copies).

    >>> group_cost([1, 8], [30, 10], block_size=16)  # 2 requests x 8 rows x (32 + 8) positions
    640
    """
    n = max(nodes)
    p = -(-max(prefix_lens) // block_size) * block_size
    return len(nodes) * n * (p + n)


def plan_groups(nodes: Sequence[int], prefix_lens: Sequence[int], block_size: int,
                overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Partition requests ``0 .. B-1`` (tree sizes ``nodes``, cached lengths ``prefix_lens``) into attention groups.

    Returns the groups (each a list of request indices, ascending), cheapest plan under :func:`group_cost` plus
    ``overhead`` per group, among cuts of the requests sorted by (tree size, prefix length). ``O(B^2)``.

    >>> plan_groups([8, 1, 1, 1, 8, 1], [400] * 6, block_size=16)
    [[1, 2, 3, 5], [0, 4]]
    >>> plan_groups([2, 1], [16, 16], block_size=16)  # padding one node is cheaper than a second call
    [[0, 1]]
    """
    b = len(nodes)
    if b == 0:
        return []
    order = sorted(range(b), key=lambda i: (nodes[i], prefix_lens[i]))
    blocks = [-(-prefix_lens[i] // block_size) * block_size for i in order]
    best = [0] + [None] * b  # best[j]: cheapest plan for order[:j]
    cut = [0] * (b + 1)  # cut[j]: where the last group of that plan starts
    for j in range(1, b + 1):
        n = nodes[order[j - 1]]  # sorted by size: the run's last request has the largest tree
        p = 0
        for i in range(j - 1, -1, -1):
            p = max(p, blocks[i])
            cost = best[i] + (j - i) * n * (p + n) + overhead
            if best[j] is None or cost <= best[j]:  # ties: the longer run (fewer calls)
                best[j], cut[j] = cost, i
    groups, j = [], b
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]
