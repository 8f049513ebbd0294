"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of `AsyncLLMEngine`."""

from kvlm.server.app import build_app

__all__ = ["build_app"]
