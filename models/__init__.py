"""avray models."""
