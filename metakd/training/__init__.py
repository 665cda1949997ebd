"""metakd.training."""
