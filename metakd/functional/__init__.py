"""metakd.functional."""
