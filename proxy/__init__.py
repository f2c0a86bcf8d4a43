"""tokenrelay proxy: the OpenAI-compatible HTTP front door.

Runs as its own process tree (`python -m proxy`): a gunicorn master plus gevent workers. Each worker
subscribes to the head's routing table and holds one ZeroMQ DEALER per replica. This package file owns no
socket and imports nothing heavy: importing `proxy` must never import prometheus_client, gevent or zmq.

Module map:
  config.py         ProxyConfig (frozen), CLI/env parsing, the metrics-dir env var
  server.py         gunicorn BaseApplication + hooks; `run(config)`
  gateway.py        per-worker object joining the table subscriber, replica pool and router
  subscriber.py     routing-table subscriber greenlet (head DEALER + SUB; Clone pattern)
  table_state.py    pure: apply/ignore/stale decisions for routing tables
  backoff.py        pure: exponential backoff for head reconnects
  replicas.py       one DEALER per replica, reader + monitor greenlets, in-flight bookkeeping
  streams.py        per-request queue handed from reader greenlets to request greenlets
  router.py         pure: least in-flight choice
  app.py            Falcon app: routes, middleware, error handlers
  openai_request.py pure: what the proxy reads of a body (routing fields; relayed to vLLM replicas as is),
                    and the mock engine's request mapping with its refusals
  chunks.py         pure: SSE chunk / JSON body bytes (mapped path; vLLM replicas send their own)
  bodies.py         WSGI streaming bodies (SSE, relayed, plain) whose close() aborts the request
  errors.py         exception hierarchy and OpenAI error bodies
  metrics.py        prometheus metrics (multiprocess mode)
"""
