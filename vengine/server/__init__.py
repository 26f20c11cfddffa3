"""`vengine serve`: an OpenAI-compatible HTTP server over one LLM (FastAPI + uvicorn, optional).

`protocol.py` checks requests and shapes responses, `engine_loop.py` is the one thread that owns
the engine, `app.py` the routes and `serve`, `static/index.html` a chat page. Nothing below
imports this package, and importing it imports no web framework (app.py does).
"""
