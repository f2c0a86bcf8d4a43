"""agent: one per host; registers with the head, starts and supervises this host's replicas."""
