"""metakd.runs."""
