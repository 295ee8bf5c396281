"""Token prefixes that several questions share, as a tree (each node is encoded once).

Contexts that start with the same tokens need those tokens encoded only once, and the shared
prefixes nest: MMLU's description ("The following are multiple choice questions (with
answers) about") opens every question, the subject's name follows for the questions of one
subject, and in k-shot that subject's solved examples after it; ARC's "Question:" opens every
question; consecutive HellaSwag clips of one video share their activity and first sentence.
A node is a prefix that every question under it starts with; its children are longer ones.

A node is kept only when it saves at least `min_saved` token encodings, (questions under it
- 1) x (its tokens beyond its parent's): a smaller one would cost a row and a cache copy for
little, and its questions hang on its parent instead. At least the last context token of
every question stays outside every prefix (it predicts the answer). The tree is built on the
tokens themselves, so a tokenizer that merges across a prefix's end never shares a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefixTree:
    """Nodes in depth-first order (a parent before its children, a subtree contiguous)."""

    tokens: list[list[int]]  # node g's prefix: the first tokens of every context under it
    parents: list[int]  # the node that g extends, -1 for none
    sizes: list[int]  # contexts under node g (in its subtree)
    node_of: list[int]  # per context, in the order given: its deepest node, -1 for none

    def ancestors(self, g: int) -> list[int]:
        """g's enclosing nodes, outermost first."""
        chain = []
        while self.parents[g] >= 0:
            g = self.parents[g]
            chain.append(g)
        return chain[::-1]

    def chunks(self, token_budget: int) -> list[list[int]]:
        """The nodes that contexts hang on, in consecutive runs whose prefixes hold at most
        `token_budget` tokens in all (one node alone when its prefix is longer), so the cached
        keys and values stay bounded like a batch's activations."""
        used = sorted(set(g for g in self.node_of if g >= 0))
        chunks: list[list[int]] = []
        total = 0
        for g in used:
            n = len(self.tokens[g])
            if chunks and total + n <= token_budget:
                chunks[-1].append(g)
                total += n
            else:
                chunks.append([g])
                total = n
        return chunks

    def with_ancestors(self, nodes: list[int]) -> list[int]:
        """`nodes` and every node they extend, in tree order."""
        return sorted(set(nodes).union(*(self.ancestors(g) for g in nodes)))


def _common_length(contexts: list[list[int]], members: list[int], start: int) -> int:
    """Tokens that all `members` share (they share the first `start`), leaving each its last."""
    limit = min(len(contexts[i]) - 1 for i in members)
    first = contexts[members[0]]
    n = start
    while n < limit and all(contexts[i][n] == first[n] for i in members):
        n += 1
    return n


def _split(contexts: list[list[int]], members: list[int], at: int) -> list[list[int]]:
    """`members` with tokens left past `at`, grouped by their token there (in token order);
    groups of one are dropped (a prefix of one context saves nothing)."""
    parts: dict[int, list[int]] = {}
    for i in members:
        if len(contexts[i]) - 1 > at:
            parts.setdefault(contexts[i][at], []).append(i)
    return [parts[t] for t in sorted(parts) if len(parts[t]) > 1]


def prefix_tree(contexts: list[list[int]], min_saved: int) -> PrefixTree:
    """The shared prefixes of `contexts` (token lists) worth encoding once (module doc)."""
    tree = PrefixTree([], [], [], [-1] * len(contexts))
    # Pending groups: (members, tokens they share, the enclosing node's length, its index).
    pending = [(part, _common_length(contexts, part, 1), 0, -1)
               for part in reversed(_split(contexts, list(range(len(contexts))), 0))]
    while pending:
        members, shared, base, parent = pending.pop()
        if (len(members) - 1) * (shared - base) >= min_saved:
            tree.tokens.append(contexts[members[0]][:shared])
            tree.parents.append(parent)
            tree.sizes.append(len(members))
            parent, base = len(tree.tokens) - 1, shared
            for i in members:
                tree.node_of[i] = parent
        # Not worth a node: its longer-sharing subgroups are still measured from `base`.
        pending.extend((part, _common_length(contexts, part, shared + 1), base, parent)
                       for part in reversed(_split(contexts, members, shared)))
    return tree
