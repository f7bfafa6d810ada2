"""moss-serve: an OpenAI-compatible API and a web chat for a trained MOSS-format model.

    engine.py   one decoding thread per model: continuous batching over chat.generate.DecodingBatch
    turn.py     one chat turn, streamed: the two-pass protocol of chat/protocol.py, tools run
    api.py      the HTTP surface (FastAPI): /v1/chat/completions, /v1/models, /health, the page
    cli.py      `moss-serve MODEL_DIR ...` (uvicorn)
    static/     the web page (plain HTML / CSS / JS, no build step, nothing from the network)

User documentation: docs/serve.md.
"""
