"""avray pipelines."""
