"""The demo's engines build step: `build --dry-run` plans for an H100 and a Jetson AGX Orin, a bundle for
the Orin, and the device memory each plan needs next to the dense twin's (the KV cache MoD saves).
No TensorRT and no GPU: the plans are computed from the manifests, nothing is built."""

from __future__ import annotations

import json
from pathlib import Path

DEMO_TARGETS = ("h100", "orin-jp6")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def engines_step(artifacts: dict[str, Path], workdir: Path, title: str = "Engines: build --dry-run plans") -> None:
    from rich.table import Table

    from gammamod.console import console
    from gammamod.manifest import read_manifest

    from .bundle import write_bundle
    from .plan import BuildOptions, format_plan, make_plan

    table = Table(title=f"{title}: max batch and sequence of each artifact, workspace 256 MiB (no TensorRT here: "
                        "computed from the manifests, nothing built)")
    for col in ("artifact -> target", "precision", "weights", "KV cache (MoD)", "KV dense twin", "KV saved",
                "total / device"):
        table.add_column(col, overflow="fold")
    first = None
    for name, art in artifacts.items():
        manifest = read_manifest(art)
        for target in DEMO_TARGETS:
            opts = BuildOptions(target=target, requested_precision="fp16" if manifest["model"]["dtype"] == "float32" else None,
                                workspace_mib=256)
            plan = make_plan(manifest, opts)
            (workdir / f"{Path(art).name}.build-plan.{target}.json").write_text(json.dumps(plan, indent=2) + "\n")
            first = first or plan
            mem = plan["memory"]
            saved = 1 - mem["kv_cache"] / mem["kv_cache_dense_twin"]
            table.add_row(f"{name} -> {target} (TRT {plan['tensorrt']})",
                          f"{plan['precision']} ({plan['typing_mode']})", _mib(sum(mem["weights"].values())),
                          _mib(mem["kv_cache"]), _mib(mem["kv_cache_dense_twin"]), f"{saved:.1%}",
                          f"{_mib(mem['total'])} / {mem['device'] / 2**30:.0f} GiB "
                          f"{'fits' if mem['fits'] else 'DOES NOT FIT'}")
    console.print(table)
    if first is not None:
        console.print(format_plan(first), markup=False, soft_wrap=True, highlight=False)
    name, art = next(iter(artifacts.items()))
    bundle = workdir / f"bundle-{name}-orin-jp6"
    write_bundle(art, bundle, BuildOptions(target="orin-jp6", requested_precision="fp16", workspace_mib=256), force=True)
    files = sorted(p.name for p in bundle.iterdir())
    console.print(f"bundle for orin-jp6: {bundle} ({len(files)} entries: build.sh, plugins/, "
                  f"{', '.join(f for f in files if f.endswith('.onnx') and '.trt' in f)}); on the Orin: bash build.sh",
                  soft_wrap=True)
