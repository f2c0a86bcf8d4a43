"""agent: one per host; registers with the head, starts and supervises this host's replicas.

Module map (tests/unit/test_module_maps.py keeps it complete):
  __main__.py   `python -m agent`: parse args, run the agent; exit codes
  config.py     AgentConfig, built from the command line
  server.py     the reactor: a poll loop that keeps this host's replicas as the head wants them
  lifecycle.py  pure: one replica's states, restart backoff, liveness
  devices.py    which accelerators and CPU cores this host has, and which each replica gets
  repin.py      pure: which replica to restart on fewer cores, and when
  processes.py  starting and stopping replica processes without blocking the loop
  metrics.py    prometheus metrics: replica states, CPU, memory, GPUs
"""
