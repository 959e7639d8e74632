"""The demo's last step: an ``inspect`` picture of a model's routing, then a ``serve`` round trip
with the official ``openai`` client (plain and streamed), checked against ``Pipeline.generate``."""

from __future__ import annotations

from pathlib import Path


def serving_demo(workdir: Path, artifact: Path, image: Path, routing_of: Path | None = None) -> None:
    """``routing_of``: the artifact whose routing is drawn (the bench-size model after the full
    demo); ``artifact`` is served (a tiny one: the round trip takes seconds)."""
    import base64

    from gammamod.console import console
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.validate.inspect_routing import run_inspect

    from .server import BackgroundServer, load_app

    question = "What is in the picture?"
    routing, png, _ = run_inspect(routing_of or artifact, image, question, workdir / "routing.png", force=True)
    image_kept = [routing.counts(layer)["image"] for layer in sorted(routing.kept)]
    console.print(f"[bold]9. Routing[/bold] of {routing.recipe}, {routing.source}: image patches kept per MoD layer "
                  f"{image_kept[0]} ... {image_kept[-1]} of {routing.image_block[1]}; picture: {png}", soft_wrap=True)
    try:
        import openai
    except ImportError:
        console.print("serve round trip skipped: the openai client is not installed (pip install openai)")
        return
    want = Pipeline.load(artifact).generate([image], [question], max_new_tokens=16)[0]
    app, config = load_app(artifact, max_batch=4)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(image.read_bytes()).decode()}}]}]
        plain = client.chat.completions.create(model=config.model_name, messages=messages, max_tokens=16,
                                               temperature=0).choices[0].message.content
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=config.model_name, messages=messages, max_tokens=16, temperature=0, stream=True) if chunk.choices)
    same = "equal to Pipeline.generate" if plain == streamed == want.text else "DIFFERENT from Pipeline.generate"
    console.print(f"[bold]10. Serve[/bold]: {url}/v1/chat/completions with the openai client, plain and streamed: "
                  f"{plain!r} ({same})", soft_wrap=True)
