"""``dia2-rt serve``: streaming speech over HTTP (OpenAI-compatible), a WebSocket, and a browser page.

Needs the ``[serve]`` extra (FastAPI, uvicorn, websockets, prometheus-client). Importing this
package stays cheap: the web stack is imported only by ``app`` and what it pulls in.

Modules: ``command`` (the CLI), ``app`` (the ASGI app and its shared state), ``routes``
(HTTP endpoints), ``websocket`` (``/v1/stream``), ``page`` (the browser page), ``workers``
(jobs, worker threads, the bounded queue), ``schema`` (request bodies and errors), ``audio``
(response formats), ``voices`` (the voice-name registry), ``metrics`` (Prometheus), ``guard``
(connection deadlines and cap, the Host/Origin checks, the listening socket).
"""
