"""Model: where the model comes from (sources, sharded loading, weight files), its pruning layout, and the
gp_pruned architecture that pruned models are built as."""
