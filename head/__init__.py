"""head: holds deployments, tracks agents and replicas, publishes the routing table."""
