"""The decoder-only MoE transformer and its routing math."""
