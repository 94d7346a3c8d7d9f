"""Export: pruned checkpoints on disk — save and load, and the repair of checkpoints with older shipped code."""
