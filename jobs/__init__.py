"""avray jobs."""
