"""Backing chains: resolving them, the guest view over them, and the operations that move data
between their layers (commit, rebase, convert)."""
