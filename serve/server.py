"""Run the OpenAI-compatible app with uvicorn: in the foreground (``gammamod serve``) or on a
background thread bound to a socket of its own (tests, the demo, the load script)."""

from __future__ import annotations

import socket
import threading
import time

from gammamod.errors import GammamodError


def _uvicorn():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise GammamodError("gammamod serve needs Starlette and uvicorn: pip install 'gammamod[serve]'") from None
    return uvicorn


def load_app(artifact, max_batch: int | None = None, model_name: str | None = None, backend: str = "ort",
             device: str = "cpu", threads: int | None = None, verify: bool = True, **limits):
    """The pipeline and the app serving it. ``limits``: ServerConfig fields (max_body_bytes,
    max_waiting) and Limits fields (max_tokens, default_max_tokens, allow_local_files)."""
    from pathlib import Path

    from gammamod.runtime.pipeline import Pipeline

    from .app import ServerConfig, create_app
    from .chat_request import Limits

    _uvicorn()
    pipe = Pipeline.load(artifact, backend=backend, device=device, threads=threads, verify=verify)
    most = pipe.manifest["kv_cache"]["max_batch"]
    max_batch = max_batch or most
    if max_batch > most:
        raise GammamodError(f"--max-batch {max_batch}: the artifact takes at most {most} rows (re-export with a larger "
                            "--max-batch)")
    limit_fields = {k: limits.pop(k) for k in list(limits) if k in Limits.__dataclass_fields__}
    config = ServerConfig(model_name=model_name or Path(artifact).resolve().name, max_batch=max_batch,
                          limits=Limits(**limit_fields), **limits)
    return create_app(pipe, config), config


def serve_forever(app, host: str, port: int) -> None:
    """``gammamod serve``: until Ctrl-C or SIGTERM (uvicorn finishes the requests in flight)."""
    uvicorn = _uvicorn()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise GammamodError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    with sock:
        server.run(sockets=[sock])


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves on 127.0.0.1 at a free port the kernel picks
    (bound before the thread starts, so no other process can take it), and stops on exit."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 60.0):
        uvicorn = _uvicorn()
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="gammamod-serve")
        self.start_timeout = start_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GammamodError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
