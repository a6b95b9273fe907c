"""`gemmalite serve`: an OpenAI-compatible HTTP server on the continuous-batching scheduler.

- protocol.py: the OpenAI request and response shapes, checked; no web framework.
- app.py: the Starlette app: endpoints, server-sent events, disconnects, JSON errors.

The work is done by the scheduler (gemmalite/batching.py); cli/serve.py runs the app in uvicorn.
This package needs the `serve` extra (starlette, uvicorn): `pip install 'gemmalite[serve]'`.
"""
