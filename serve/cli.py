"""The serve stage's subcommands: serve, triton-repo (no torch)."""

from __future__ import annotations

from pathlib import Path

from gammamod.cli import positive_int


def cmd_serve(args) -> int:
    from gammamod.console import console

    from .server import load_app, serve_forever

    app, config = load_app(args.artifact, max_batch=args.max_batch, model_name=args.model_name, backend=args.backend,
                           device=args.device or "cpu", threads=args.threads, verify=not args.no_verify,
                           max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                           allow_local_files=args.allow_local_files, max_body_bytes=args.max_body_mb * 2**20,
                           max_waiting=args.max_waiting)
    console.print(f"serving {config.model_name!r} on http://{args.host}:{args.port}/v1 (batch of {config.max_batch}, "
                  f"at most {config.limits.max_tokens} tokens a request); Ctrl-C stops", markup=False, soft_wrap=True)
    serve_forever(app, args.host, args.port)
    return 0


def cmd_triton_repo(args) -> int:
    from gammamod.console import console

    from .triton_repo import write_triton_repo

    out = write_triton_repo(args.artifact, args.out, force=args.force, copy=args.copy, max_batch=args.max_batch,
                            device=args.device, python_site=args.python_site)
    console.print(f"wrote the Triton model repository {out}; see {out / 'README.md'}", markup=False, soft_wrap=True)
    return 0


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for an artifact (no torch)",
                       description="Serve an artifact over HTTP the way OpenAI's API does: /v1/chat/completions "
                                   "(images as data: URIs, stream: true as server-sent events), /v1/models, /health. "
                                   "Concurrent requests are decoded together (continuous batching).")
    p.add_argument("artifact", type=Path, help="artifact directory written by 'gammamod export'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=None, help="requests decoded together (default: the "
                   "artifact's max batch)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the artifact directory's)")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="the most tokens one request may ask for")
    p.add_argument("--default-max-tokens", type=positive_int, default=256, help="tokens when a request names none")
    p.add_argument("--max-body-mb", type=positive_int, default=20, help="largest request body (MiB)")
    p.add_argument("--max-waiting", type=positive_int, default=256, help="requests queued for a row before 503")
    p.add_argument("--allow-local-files", action="store_true", help="take image_url as a local absolute path or "
                   "file:// URL (off: only data: URIs)")
    p.add_argument("--backend", default="ort", choices=("ort", "tensorrt"))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository for an artifact",
                       description="Write a Triton model repository: the vision model and the decoder for the "
                                   "TensorRT backend (engines from 'gammamod build') and for the ONNX Runtime "
                                   "backend, and a Python-backend model that generates with gammamod's runtime and "
                                   "streams tokens.")
    p.add_argument("artifact", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--copy", action="store_true", help="copy the artifact's graphs into the repository (default: "
                   "symbolic links to them)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="rows the generate model decodes together "
                   "(default: the artifact's max batch)")
    p.add_argument("--device", default="cpu", help="where the generate models run the artifact: cpu, cuda:N")
    p.add_argument("--python-site", type=Path, action="append", default=[], metavar="DIR",
                   help="a site-packages directory holding gammamod, added by the generate models before importing "
                        "it (Triton's Python backend is isolated from PYTHONPATH); repeatable")
    p.add_argument("--force", action="store_true", help="replace a repository gammamod wrote")
    p.set_defaults(func=cmd_triton_repo)
