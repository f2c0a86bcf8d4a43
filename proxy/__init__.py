"""tokenrelay proxy: the OpenAI-compatible HTTP front door.

Runs as its own process tree (`python -m proxy`): a gunicorn master plus gevent workers. Each worker
subscribes to the head's routing table and holds one ZeroMQ DEALER per replica. This package file owns no
socket and imports nothing heavy: importing `proxy` must never import prometheus_client, gevent or zmq.

Module map (tests/unit/test_module_maps.py keeps it complete):
  __main__.py         `python -m proxy`: parse args, set up logging and metrics, serve
  config.py           ProxyConfig (frozen), CLI over env over defaults (runtime.settings)
  server.py           gunicorn BaseApplication + hooks; `run(config)`
  gunicorn_worker.py  the gevent worker class: idle connections bounded, --header-timeout, Connection: close,
                      Expect: 100-continue when the body is read
  loop_turns.py       yielding a busy greenlet so the worker's loop still polls I/O every few ms
  gunicorn_hooks.py   what the proxy changes in gunicorn's handling of bad clients
  idle_connections.py pure: which idle client connections a worker closes
  gateway.py          per-worker object joining the table subscriber, replica pool, router and queues
  subscriber.py       routing-table subscriber greenlet (head DEALER + SUB; Clone pattern)
  table_state.py      pure: apply/ignore/stale decisions for routing tables, readiness
  backoff.py          pure: exponential backoff for head reconnects and replica handshake retries
  replica_pool.py     all replica connections of one worker, kept in step with the routing table
  replicas.py         one worker's connection to one replica: reader + monitor greenlets, in-flight requests
  handshake.py        pure: a replica connection's handshake outcomes (refused key: reopen with backoff)
  raw_dealer.py       the plain pyzmq DEALER behind replicas.py (the one zmq fast path; its invariant)
  streams.py          per-request queue handed from reader greenlets to request greenlets
  client_sink.py      writes a stream's tokens straight to the client socket from the reader greenlet
  router.py           pure: replica choice by power of two choices on load, prefix and session affinity
  admission.py        pure: the bounded per-deployment wait queue and its verdicts (admit, wait, 429, 503)
  breaker.py          pure: circuit breaker per replica (eject, cool down, probe)
  dispatch.py         one request's way to a replica: admission, choice, send, first token, retries, resume
  app.py              Falcon app: routes, error handlers
  request_body.py     reading a request body: size, stalls, pace, chunked framing, media type, JSON depth
  middleware.py       Falcon middleware: request ids, metrics, API keys and rate limits
  access.py           pure: API keys and per-key rate limits
  openai_request.py   pure: what the proxy reads of a body (routing fields; relayed to vLLM replicas as is),
                      and the mock engine's request structs (its one schema), mapping and refusals
  openapi.py          the OpenAPI document served at GET /openapi.json (mock request schemas derived)
  chunks.py           pure: SSE chunk / JSON body bytes (mapped path; vLLM replicas send their own)
  bodies.py           WSGI streaming bodies (SSE, relayed, plain) whose close() aborts the request
  errors.py           exception hierarchy and OpenAI error bodies
  metrics.py          prometheus metrics (multiprocess mode)
"""
