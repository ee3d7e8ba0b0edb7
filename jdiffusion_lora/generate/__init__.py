"""Batch generation for a style-LoRA submission: plan -> (parallel) render -> manifest -> package.

    from jdiffusion_lora.generate import read_inputs, build_items, GenerateSettings, run_job
    inputs, llm = read_inputs("styles")
    items = build_items(inputs, llm, template="challenge", base_seed=114514)
    run_job(items, GenerateSettings(model=path, steps=100), "out", workers=2)
"""
from .manifest import TIMING_FIELDS, read_manifest, without_timing
from .parallel import JobResult, run_job
from .plan import Item, PlanError, build_items, escape_stem, item_seed, read_inputs, unescape_stem
from .prompts import PRESETS, render
from .runner import GenerateSettings, LoraSpec, generate_items, load_job_pipeline

__all__ = [
    "Item", "PlanError", "build_items", "escape_stem", "unescape_stem", "item_seed", "read_inputs",
    "PRESETS", "render", "GenerateSettings", "LoraSpec", "generate_items", "load_job_pipeline",
    "JobResult", "run_job", "TIMING_FIELDS", "read_manifest", "without_timing",
]
