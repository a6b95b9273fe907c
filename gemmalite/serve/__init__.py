"""`gemmalite serve`: an OpenAI-compatible HTTP server on the continuous-batching scheduler.

- protocol.py: the OpenAI request and response shapes, checked; no web framework.
- app.py: the Starlette app: endpoints, server-sent events, disconnects, timeouts, JSON errors,
  and its states (loading, serving, draining);
- media.py: where an image_url's bytes may come from (data: URLs; http(s) and files if allowed);
- auth.py: the API key, required on every route but those listed as public;
- metrics.py: /metrics in Prometheus' format, under vLLM's names;
- requestlog.py: one log line per request, and the per-request figures the metrics count.

The work is done by the scheduler (gemmalite/batching.py); cli/serve.py runs the app in uvicorn.
This package needs the `serve` extra (starlette, uvicorn, prometheus_client): `pip install 'gemmalite[serve]'`.
"""
