"""metakd.bench."""
