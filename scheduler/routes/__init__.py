"""The HTTP API, one router per noun (runs, logs, nodes, endpoints, blobs, keys) plus the inference gateway's
bare ASGI handler. Routes stay thin: they authenticate (deps.auth), call the Scheduler, and shape answers.
Everything a route needs comes through `Depends` (deps.ctx), so a route is testable without a process
(fastapi.testclient over create_app)."""
