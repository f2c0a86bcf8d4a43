"""model_proc: one replica process. A ZeroMQ ROUTER that proxies connect to, an engine inside."""
