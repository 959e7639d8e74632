"""The engines stage's subcommands: check-onnx, build, bundle."""

from __future__ import annotations

from pathlib import Path

from gammamod.engines.targets import DEVICES, PRECISIONS, TARGETS


def cmd_check_onnx(args) -> int:
    from gammamod.engines.lint import lint_artifact, lint_model_file

    from gammamod.console import console

    path = Path(args.path)
    if path.is_dir():
        findings, files = lint_artifact(path, args.tensorrt)
    else:
        findings, files = lint_model_file(path, args.tensorrt), [path.name]
    errors = [f for f in findings if f.severity == "error"]
    for f in findings:
        console.print(str(f), markup=False, soft_wrap=True, style="red" if f.severity == "error" else "yellow")
    console.print(f"TensorRT {args.tensorrt}: checked {', '.join(files)}: {len(errors)} errors, "
                  f"{len(findings) - len(errors)} warnings", soft_wrap=True)
    return 1 if errors else 0


def _span_lengths(text: str) -> list[int]:
    from gammamod.errors import GammamodError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GammamodError(f"--span-lengths {text!r}: expected N[,N...]") from None


def _options(args, target: str):
    from gammamod.engines.plan import BuildOptions

    return BuildOptions(target=target, requested_precision=args.requested_precision, tensorrt=args.tensorrt, max_batch=args.max_batch,
                        max_seq=args.max_seq, span_lengths=_span_lengths(args.span_lengths) if args.span_lengths else None,
                        timing_cache=args.timing_cache, opt_level=args.opt_level, workspace_mib=args.workspace,
                        hardware_compat=args.hardware_compat, version_compatible=args.version_compatible,
                        mod_ops=args.mod_ops)


def _write_json(path: Path, data) -> None:
    import json
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def cmd_build(args) -> int:
    from gammamod.console import console
    from gammamod.engines.plan import format_plan, make_plan
    from gammamod.errors import GammamodError
    from gammamod.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    dev = None
    if args.target == "auto" or not args.dry_run:
        from gammamod.engines.gpu import local_gpu

        if not args.dry_run:
            from gammamod.engines.build import tensorrt_module

            tensorrt_module()  # refuses in one line, before anything is read further or written
        gpu = local_gpu()
        if gpu is None:
            from gammamod.engines.build import INSTALL

            raise GammamodError(("--target auto needs an NVIDIA GPU on this machine; name a target: "
                                 + ", ".join(DEVICES)) if args.dry_run else INSTALL + " (no GPU found)")
        if args.target == "auto":
            from gammamod.engines.targets import device_for

            dev = device_for(gpu.name, gpu.compute_capability, gpu.memory_gib)
        elif DEVICES[args.target].compute_capability != gpu.compute_capability:
            want = DEVICES[args.target]
            raise GammamodError(f"--target {args.target} is {want.sm}, this GPU ({gpu.name}) is sm_"
                                f"{gpu.compute_capability[0]}{gpu.compute_capability[1]}: engines are built on the GPU "
                                "they run on (use --target auto, or 'gammamod bundle' for a Jetson)")
    opts = _options(args, dev.name if dev else args.target)
    if not args.dry_run:
        import tensorrt

        from gammamod.engines.build import parser_version

        opts.tensorrt = parser_version(tensorrt.__version__)
    plan = make_plan(manifest, opts, dev)
    console.print(format_plan(plan), markup=False, soft_wrap=True, highlight=False)
    if args.dry_run:
        path = args.plan or Path(f"{str(Path(args.artifact)).rstrip('/')}.build-plan.{plan['target']['name']}.json")
        _write_json(Path(path), plan)
        console.print(f"plan written to {path} (dry run: nothing built)", soft_wrap=True)
        return 0 if plan["memory"]["fits"] else 1
    if not plan["memory"]["fits"]:
        raise GammamodError(f"the engines do not fit {plan['target']['gpu']}: {plan['memory']['advice']}")
    from gammamod.engines.build import build_engines

    record = build_engines(manifest, plan, gpu, plugin_library=args.plugin_library)
    console.print(f"built {', '.join(record['files'].values())} with TensorRT {record['tensorrt']} in "
                  f"{record['build_seconds']} s", soft_wrap=True)
    return 0


def cmd_bundle(args) -> int:
    from gammamod.console import console
    from gammamod.engines.bundle import write_bundle
    from gammamod.engines.plan import format_plan

    plan = write_bundle(args.artifact, args.out, _options(args, args.target), force=args.force)
    console.print(format_plan(plan), markup=False, soft_wrap=True, highlight=False)
    console.print(f"bundle written to {args.out}: copy it to the {plan['target']['gpu']} and run 'bash build.sh' there",
                  soft_wrap=True)
    return 0


def _build_options(p, targets) -> None:
    p.add_argument("--target", required=True, choices=targets, metavar="NAME",
                   help=f"the GPU: {', '.join(targets)}")
    p.add_argument("--precision", dest="requested_precision", choices=PRECISIONS,
                   help="default: the artifact's dtype (fp8/int8/int4 take the Q/DQ artifact the calib stage writes)")
    p.add_argument("--tensorrt", choices=tuple(TARGETS), help="TensorRT the plan is for (default: the target's; a real "
                                                              "build uses the installed one)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-seq", type=int)
    p.add_argument("--span-lengths", metavar="N[,N...]", help="routed span lengths (image tokens) to support")
    p.add_argument("--timing-cache", metavar="FILE", help="read and updated")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    p.add_argument("--workspace", type=int, default=1024, metavar="MIB", help="builder workspace (default 1024 MiB)")
    p.add_argument("--hardware-compat", choices=("none", "ampere+", "same-cc"), default="none")
    p.add_argument("--version-compatible", action="store_true", help="plugin library serialised into the engine")
    p.add_argument("--mod-ops", choices=("plugin", "native"), default="plugin",
                   help="plugin: our IPluginV3 library; native: TensorRT's TopK/GatherND/ScatterND (no library)")


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("check-onnx", help="lint an artifact or ONNX file for a TensorRT version's parser",
                       description="Read the graphs statically and report what that TensorRT version's ONNX parser "
                                   "would reject: unsupported ops (in If branches too), TopK K >= 3840 or computed from data, custom nodes "
                                   "without plugin attributes, function bodies that would shadow the plugin, "
                                   "data-dependent shapes. Exit 1 on errors.")
    p.add_argument("path", type=Path, help="artifact directory or .onnx file")
    p.add_argument("--tensorrt", required=True, choices=tuple(TARGETS))
    p.set_defaults(func=cmd_check_onnx)

    p = sub.add_parser("build", help="build TensorRT engines for this GPU (--dry-run: the plan, no TensorRT needed)",
                       description="Build the vision engine and one decoder engine with a prefill and a decode "
                                   "profile into ARTIFACT/engines, and record them in the manifest. --dry-run prints "
                                   "and writes the plan (profiles, precision, memory against the target) without "
                                   "TensorRT or a GPU.")
    p.add_argument("artifact", type=Path)
    _build_options(p, ("auto",) + tuple(DEVICES))
    p.add_argument("--dry-run", action="store_true", help="print and write the plan; build nothing")
    p.add_argument("--plan", type=Path, metavar="FILE", help="where --dry-run writes the plan "
                                                             "(default ARTIFACT.build-plan.TARGET.json)")
    p.add_argument("--plugin-library", metavar="FILE", help="a built libgammamod_plugins.so (default: built here "
                                                            "with CMake)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("bundle", help="a self-contained folder that builds and runs the engines on a Jetson",
                       description="Write OUT with the TensorRT ONNX copies, weights, manifest, plugin sources and "
                                   "CMake, tokenizer, and build.sh, which on the device builds the plugin library, "
                                   "the engines and runs a smoke generation.")
    p.add_argument("artifact", type=Path)
    p.add_argument("out", type=Path)
    _build_options(p, tuple(DEVICES))
    p.add_argument("--force", action="store_true", help="replace OUT if it is a bundle")
    p.set_defaults(func=cmd_bundle)
