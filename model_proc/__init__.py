"""model_proc: one replica process. A ZeroMQ ROUTER that proxies connect to, an engine inside.

Module map (tests/unit/test_module_maps.py keeps it complete):
  __main__.py          `python -m model_proc`: start one replica (normally the agent does)
  config.py            ReplicaConfig, built from the command line; exit codes
  server.py            the replica server: ZeroMQ in front of one engine
  load_push.py         which proxy workers to tell the replica's load, and when
  agent_link.py        the DEALER to the agent: ReplicaHello, ReplicaStatus heartbeat, ReplicaDead
  data_access.py       with CURVE keys: ZAP on the data socket, each request's proxy key checked again
  engine.py            the Engine interface every engine implements, and the engine lookup
  mock_engine.py       deterministic fake text with configurable timing (tests and benchmarks)
  vllm_engine.py       the real engine: vLLM's v1 AsyncLLM behind the Engine interface
  vllm_mapping.py      pure: engine arguments, sampling parameters, vLLM errors and stats in our terms
  vllm_serving.py      vLLM's own OpenAI serving layer inside the replica, driven without HTTP
  vllm_process_env.py  process-level settings made before vLLM's engine starts (IPC socket paths)
  metrics.py           prometheus metrics of a replica, read from the server at scrape time
  ttft_window.py       time to first token over a sliding window (ReplicaStatus.ttft_p90_s)
  relay_resume.py      resuming a relayed vLLM stream: which token ids were sent, the continuation's chunks
"""
