"""Serving: an OpenAI-compatible HTTP server with continuous batching (``gammamod serve``) and a
Triton Inference Server model repository (``gammamod triton-repo``).

Like the runtime it sits on, this stage never imports torch. The HTTP stack (Starlette, uvicorn)
is the optional extra ``gammamod[serve]``; Triton's client is ``gammamod[triton]``.
"""
