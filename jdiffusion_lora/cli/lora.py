"""`lora inspect | convert | merge`: look into, convert and bake in LoRA files.

    python -m jdiffusion_lora.cli lora inspect FILE [--json] [--model DIR]
    python -m jdiffusion_lora.cli lora convert IN OUT --to kohya|diffusers [--dtype fp16]
    python -m jdiffusion_lora.cli lora merge --model DIR|FILE|org/name --lora FILE --out DIR|model.safetensors

kohya names are mapped through the module names of `--model` when given, otherwise through
the standard Stable Diffusion 1.x/2.x/XL names.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import warnings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lora", help="inspect, convert and merge LoRA files",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="lora_command", required=True)

    i = sub.add_parser("inspect", help="format, modules per block, rank, alpha, size, base model, compatibility")
    i.add_argument("file", help="LoRA file (.safetensors / .bin) or a folder holding one")
    i.add_argument("--model", default=None, help="diffusers model folder whose module names map kohya keys")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=run_inspect)

    c = sub.add_parser("convert", help="rewrite a LoRA file in kohya or diffusers format")
    c.add_argument("input")
    c.add_argument("output", help="output .safetensors file (a folder gets pytorch_lora_weights.safetensors)")
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: keep")
    c.add_argument("--model", default=None, help="diffusers model folder whose module names map kohya keys")
    c.add_argument("--no-strict", action="store_true", help="skip (and list) keys that cannot be mapped")
    c.set_defaults(func=run_convert)

    m = sub.add_parser("merge", help="write a new model (folder or single file) with the LoRA baked into the weights")
    m.add_argument("--model", required=True, help="diffusers model folder, single-file checkpoint or org/name")
    m.add_argument("--lora", required=True, help="LoRA file or folder")
    m.add_argument("--out", required=True, help="new model folder (must not exist or be empty), or a .safetensors "
                                                "file in the original single-file layout (A1111 / ComfyUI)")
    m.add_argument("--scale", type=float, default=1.0, help="LoRA strength")
    m.add_argument("--no-strict", action="store_true", help="skip (and list) modules that do not fit")
    m.set_defaults(func=run_merge)


# --------------------------------------------------------------------------- inspect

def _block(component: str, path: str) -> str:
    parts = path.split(".")
    if component == "unet":
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
            return f"{parts[0]}.{parts[1]}"
        return parts[0]
    if "layers" in parts:
        k = parts.index("layers")
        return f"layers.{parts[k + 1]}" if k + 1 < len(parts) else "layers"
    return parts[0]


def _counts(values):
    c = collections.Counter(values)
    return {str(k): n for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def inspect_lora(path: str, model_dir=None) -> dict:
    """A plain dict describing a LoRA file (what `lora inspect` prints)."""
    from ..lora.formats import detect_format, find_lora_file, parse_lora_state_dict, read_lora_file
    from ..lora.writing import compatibility_report, guess_base_model
    from ..weights import read_safetensors

    path = find_lora_file(path)
    tensors, metadata = read_lora_file(path)
    dtypes = read_safetensors(path)[1] if path.endswith(".safetensors") else \
        {k: str(v.dtype) for k, v in tensors.items()}
    tables = name_tables_for(model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = parse_lora_state_dict(tensors, metadata, tables, strict=False, source=path)
    unmapped = [str(w.message) for w in caught if "could not be used" in str(w.message)]
    modules = state.modules
    blocks = collections.OrderedDict()
    for key in sorted(modules):
        component, module_path = key.split(".", 1)
        blocks.setdefault(component, collections.Counter())[_block(component, module_path)] += 1
    compat = compatibility_report(state)
    if state.source_format not in ("kohya", "lycoris"):
        keys_without_lora = [k for k in tensors if "lora" not in k]
        if keys_without_lora:
            compat["diffusers"].append(f"{len(keys_without_lora)} key(s) without 'lora' in the name "
                                       f"(diffusers refuses the file): {keys_without_lora[:3]}")
    report = {
        "file": path,
        "size_bytes": os.path.getsize(path),
        "format": detect_format(tensors),
        "tensors": len(tensors),
        "parameters": state.num_params(),
        "dtypes": _counts(dtypes.values()),
        "modules": len(modules),
        "kinds": _counts(e.kind for e in modules.values()),
        "dora_modules": sum(e.uses_dora for e in modules.values()),
        "rank": _counts(e.rank for e in modules.values()),
        "alpha": _counts(e.alpha if e.alpha is not None else "none (= rank)" for e in modules.values()),
        "scale": _counts(round(e.scale, 6) for e in modules.values()),
        "blocks": {c: dict(b) for c, b in blocks.items()},
        "base_model_guess": metadata.get("ss_base_model_version") or guess_base_model(state) or "unknown",
        "metadata": {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in metadata.items()},
        "unmapped": unmapped,
        "diffusers_would_reject": compat["diffusers"],
        "a1111_would_reject": compat["a1111"],
    }
    return report


def _print_report(r: dict) -> None:
    print(f"file:        {r['file']} ({r['size_bytes'] / 1e6:.2f} MB)")
    print(f"format:      {r['format']}")
    print(f"tensors:     {r['tensors']}  parameters: {r['parameters']:,}  dtypes: {r['dtypes']}")
    print(f"modules:     {r['modules']}  kinds: {r['kinds']}  DoRA: {r['dora_modules']}")
    print(f"rank:        {r['rank']}")
    print(f"alpha:       {r['alpha']}")
    print(f"scale:       {r['scale']}  (alpha / rank)")
    print(f"base model:  {r['base_model_guess']}")
    for component, blocks in r["blocks"].items():
        print(f"{component}: " + ", ".join(f"{b} {n}" for b, n in blocks.items()))
    for k, v in r["metadata"].items():
        print(f"  meta {k} = {v}")
    for title, key in (("unmapped keys", "unmapped"), ("diffusers would reject", "diffusers_would_reject"),
                       ("A1111 would reject", "a1111_would_reject")):
        items = r[key]
        print(f"{title}: {'none' if not items else len(items)}")
        for item in items[:20]:
            print(f"  - {item}")
        if len(items) > 20:
            print(f"  ... and {len(items) - 20} more")


def run_inspect(args) -> int:
    report = inspect_lora(args.file, args.model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


# --------------------------------------------------------------------------- convert / merge

def name_tables_for(model_dir):
    """kohya name tables from a model folder's weight names, or None (standard SD names)."""
    if not model_dir:
        return None
    from ..hub import resolve_model
    from ..lora.formats import kohya_name_table
    from ..lora.loader import folder_module_names
    from ..pipelines.single_file import build_unloaded, is_single_file

    model_dir = resolve_model(model_dir)
    if is_single_file(model_dir):
        models = build_unloaded(model_dir)
        names = {c: [k[:-len(".weight")] for k in models[c].state_dict() if k.endswith(".weight")]
                 for c in ("unet", "text_encoder")}
    else:
        names = folder_module_names(model_dir)
    return {c: kohya_name_table(n, c) for c, n in names.items()}


def run_convert(args) -> int:
    from ..lora.writing import convert_lora_file
    state = convert_lora_file(args.input, args.output, to=args.to, dtype=args.dtype, strict=not args.no_strict,
                              name_tables=name_tables_for(args.model))
    print(f"{args.input} ({state.source_format}, {len(state.modules)} modules) -> {args.output} ({args.to})")
    return 0


def merge_through_pipeline(model: str, lora: str, out: str, scale: float = 1.0, strict: bool = True):
    """Merge for a single-file or HF-cache model, or into a single file: the weights go through the pipeline.

    `out` ending in .safetensors gets the original (A1111 / ComfyUI) layout, anything else a diffusers folder.
    """
    from ..lora.loader import merge_lora_into_weights
    from ..pipelines.single_file import write_single_file
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    if os.path.exists(out) and (os.path.isfile(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists; choose a new name")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    weights = {c: getattr(pipe, c).numpy_state_dict() for c in ("unet", "vae", "text_encoder")}
    updates = merge_lora_into_weights(weights, lora, scale, strict, source=model)
    for component, new in updates.items():
        weights[component].update(new)
    if out.lower().endswith(".safetensors"):
        write_single_file(weights, pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, out)
    else:
        for component, new in updates.items():
            getattr(pipe, component).load_numpy_state_dict(weights[component], source=lora)
        pipe.save_pretrained(out)
    return {c: len(n) for c, n in updates.items()}


def run_merge(args) -> int:
    from ..lora.loader import merge_lora_into_folder
    from ..pipelines.single_file import is_single_file

    if os.path.isdir(args.model) and not args.out.lower().endswith(".safetensors") and not is_single_file(args.out):
        counts = merge_lora_into_folder(args.model, args.lora, args.out, scale=args.scale, strict=not args.no_strict)
    else:
        counts = merge_through_pipeline(args.model, args.lora, args.out, args.scale, strict=not args.no_strict)
    merged = ", ".join(f"{c}: {n} modules" for c, n in counts.items())
    print(f"merged {args.lora} (scale {args.scale}) into {args.out} ({merged})")
    return 0
