"""Surgery: remove the planned units for real — one tensor slicer, applied in memory or streamed from disk."""
