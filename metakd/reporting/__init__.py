"""metakd.reporting."""
