"""head: holds deployments, tracks agents and replicas, publishes the routing table.

Module map (tests/unit/test_module_maps.py keeps it complete):
  __main__.py    `python -m head`: parse args, run the head; exit codes
  config.py      HeadConfig, built from the command line
  server.py      the reactor: a poll loop around the control ROUTER and the routing PUB
  access.py      with CURVE keys: who may send which control message, replica -> agent bindings, revocations
  cluster.py     pure: the head's picture of the cluster (agents, replicas, placement, reconcile, status)
  views.py       pure: what the head shows of it: the routing table's content, `tokenrelay status`
  table.py       pure: when a routing table is published, with which (epoch, version)
  healing.py     pure: when and where a failed deployment's replica is tried again
  autoscaler.py  pure: how many replicas an autoscaled deployment should have (and proxies' ScaleDemand)
  store.py       hard state on disk (deployments, epoch) in SQLite
  metrics.py     prometheus metrics and the Prometheus service-discovery file
"""
