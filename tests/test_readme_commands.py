"""Every shell command in README.md parses (fast) and runs (slow), as written.

The commands are read out of README.md at test time, so the test follows the README. Placeholders
(`/models/sd21`, `/data/styles`, `DIR`, `FILE`, ...) are replaced through the small table below;
sizes and step counts are made small, and real-SD paths point at the built-in tiny model.
A command this table does not know how to run fails the test: extend the table, never skip it.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Commands that are not ours to run inside the test suite.
NOT_RUN = {
    "pip": "installs the package (CI runs the README set-up commands: .ci/run)",
    "python -m pytest": "the test suite itself",
    "huggingface-cli": "downloads weights (never in tests)",
}

# What starts a command line in an unlabelled block (a ```bash block is all commands).
COMMAND_WORDS = ("python ", "bash ", "pip ", "huggingface-cli ", "jdiffusion-lora ")

# (flag before the token, token) -> replacement; "{name}" fields come from the test's paths.
BY_FLAG = {
    ("--out", "DIR"): "{tmp}/merged",
    ("--weights", "DIR"): "{tmp}/no-scorer-weights",
    ("--generated", "OUT"): "{tmp}/submit",
    ("--out", "submit"): "{tmp}/submit",
    ("--out", "sub"): "{tmp}/submit",
    ("--size", "512"): "64",
    ("--steps", "100"): "2",
    ("--steps", "30"): "2",
    ("--num-images", "4"): "1",
}
BY_TOKEN = {
    "DIR": "{model}",
    "/models/sd21": "{model}",
    "/models/stable-diffusion-2-1": "{model}",
    "/data/styles": "{styles}",
    "ROOT": "{styles}",
    "FILE": "{lora}",
    "FILE:SCALE": "{lora}:0.8",
    "IN": "{lora}",
    "OUT": "{tmp}/converted.safetensors",
    "style_pack.safetensors": "{lora}",
    "out/pytorch_lora_weights.safetensors": "{lora}",
    "my.toml": "configs/demo.toml",
    "/data/B": "{styles}",
    "kohya|diffusers": "kohya",
    "...": "a red circle on a blue background",
}
# Options appended so each command runs small and writes under the test's temp folder.
SMALL = {
    "txt2img": ["--steps", "2", "--num-images", "1", "--out", "{tmp}/txt2img"],
    "train": ["--max-train-steps", "2", "--resolution", "64", "--save-every", "0", "--sample-every", "0",
              "--no-before-after", "--no-progress-bar", "--no-tensorboard", "--overwrite",
              "--output-dir", "{tmp}/train-{config}"],
    "generate": ["--no-progress"],
}

# Run order by kind (README order within a kind): `evaluate` scores what `generate` made, `package` packs it.
RUN_ORDER = ["train", "txt2img", "lora", "generate", "package", "evaluate"]


def readme_commands():
    """[(line number, command)] of the fenced bash blocks and unlabelled blocks of commands,
    continuations joined, comments cut."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    blocks, fence = [], None   # fence: (language, first line number) of the open block
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if fence is None:
                fence = (line[3:].strip(), number + 1, [])
            else:
                if fence[0] in ("bash", "sh", ""):
                    blocks.append(fence)
                fence = None
        elif fence is not None:
            fence[2].append(line)
    out = []
    for lang, first_line, body in blocks:
        first = next((ln.strip() for ln in body if ln.strip()), "")
        if not lang and not first.startswith(COMMAND_WORDS):
            continue   # an unlabelled block of program output (benchmark tables), not commands
        pending, start = "", None
        for i, line in enumerate(body):
            if not pending and not line.strip():
                continue
            start = first_line + i if not pending else start
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            command = _strip_comment(pending).strip()
            pending = ""
            if command and not command.startswith("#"):
                for part in command.split(" && "):
                    out.append((start, part.strip()))
    assert out, "no commands found in README.md"
    return out


def _strip_comment(line):
    """Cut a trailing `# comment` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def _skip_reason(command):
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def substitute(command, paths, previous_generate=None):
    """README command -> argv with placeholders replaced, plus the kind of command it is."""
    if "...same options..." in command:
        assert previous_generate, f"{command!r}: no earlier infer.py command to take the options from"
        command = command.replace("...same options...", previous_generate)
    argv = []
    for tok in shlex.split(command):
        tok = tok.strip("[]") if tok.startswith("[") or tok.endswith("]") else tok
        prev = argv[-1] if argv else None
        argv.append(BY_FLAG.get((prev, tok), BY_TOKEN.get(tok, tok)))
    kind, config = _kind(argv)
    extra = SMALL.get(kind, [])
    fields = dict(paths, config=os.path.splitext(os.path.basename(config or "none"))[0])
    argv = [a.format(**fields) for a in argv + extra]
    return argv, kind


def _kind(argv):
    if argv[:2] == ["bash", "train.sh"] or argv[:2] == ["bash", "train_pack.sh"]:
        config = "configs/demo_pack.toml" if argv[1] == "train_pack.sh" else "configs/demo.toml"
        for i, a in enumerate(argv):   # train.sh keeps the last --config it sees
            if a == "--config" and i + 1 < len(argv):
                config = argv[i + 1]
            elif a.startswith("--config="):
                config = a.split("=", 1)[1]
        return "train", config
    if argv[:1] == ["python"] and argv[1:2] in (["infer.py"], ["run_parallel.py"]):
        return "generate", None
    if argv[:3] == ["python", "-m", "jdiffusion_lora.cli"] and len(argv) > 3:
        return argv[3], None
    raise AssertionError(f"README command {' '.join(argv)!r}: the test does not know how to run it; "
                         f"add it to tests/test_readme_commands.py")


def cli_argv(argv, kind):
    """The argv that `python -m jdiffusion_lora.cli` sees for this command (for parsing)."""
    if kind == "train" and argv[0] == "bash":
        _, config = _kind(argv)
        rest, skip = [], False
        for a in argv[2:]:
            if skip:
                skip = False
            elif a == "--config":
                skip = True
            elif not a.startswith("--config="):
                rest.append(a)
        return ["train", "--config", config, *rest]
    if kind == "generate" and argv[0] == "python" and argv[1] in ("infer.py", "run_parallel.py"):
        return ["generate", *argv[2:]]
    return argv[3:]


def _fake_paths(tmp):
    return {"tmp": str(tmp), "model": str(tmp / "model"), "styles": os.path.join(ROOT, "styles"),
            "lora": str(tmp / "lora.safetensors")}


# mpirun's options that take a value (the rest of the line is the command it launches).
MPIRUN_VALUED = {"-np", "-n", "-H", "--host", "-x", "--hostfile", "--map-by", "--bind-to"}


def launched(command):
    """The one-process command inside a multi-process launch, and whether it was one:
    `mpirun [options] CMD` -> CMD; `bash train.sh --nproc N ...` -> the same without `--nproc N`.
    Several processes are tests/test_distributed.py's to run (mpirun with 2 ranks on CPU); this test
    parses what each rank runs."""
    tokens = shlex.split(command)
    if tokens[0] == "mpirun":
        i = 1
        while i < len(tokens) and tokens[i].startswith("-"):
            i += 2 if tokens[i] in MPIRUN_VALUED else 1
        return shlex.join(tokens[i:]), True
    if tokens[:2] == ["bash", "train.sh"] and "--nproc" in tokens:
        i = tokens.index("--nproc")
        return shlex.join(tokens[:i] + tokens[i + 2:]), True
    return command, False


def _commands_to_run():
    """[(line, command, previous infer.py options, multi-process)] of the README commands we run."""
    previous_generate, out = None, []
    for line, command in readme_commands():
        if _skip_reason(command):
            continue
        command, multi = launched(command)
        out.append((line, command, previous_generate, multi))
        if command.startswith("python infer.py "):
            previous_generate = command[len("python infer.py "):]
    return out


def test_readme_commands_parse(tmp_path):
    """Each README command parses with the CLI's own argparse (a wrong flag fails here, in a second)."""
    from jdiffusion_lora.cli import build_parser
    from jdiffusion_lora.train.config import build_config, overrides_from_args

    parser = build_parser()
    commands = _commands_to_run()
    assert any(c.startswith("python -m jdiffusion_lora.cli package") for _, c, _, _ in commands)
    for line, command, previous, _ in commands:
        argv, kind = substitute(command, _fake_paths(tmp_path), previous)
        try:
            args = parser.parse_args(cli_argv(argv, kind))
        except SystemExit:
            pytest.fail(f"README.md line {line}: {command!r} does not parse")
        if kind == "train":   # the config file and every override must also resolve
            build_config(os.path.join(ROOT, args.config), overrides_from_args(args))


def test_readme_command_table_is_used():
    """Guard against a stale table: every placeholder the README uses is one we replace."""
    words = {tok for _, c, _, _ in _commands_to_run() for tok in re.findall(r"\b[A-Z]{2,}(?::[A-Z]+)?\b", c)}
    assert words <= set(BY_TOKEN), f"README placeholders without a substitution: {words - set(BY_TOKEN)}"


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """Run every README command, in order, small, on the built-in model; each must exit 0."""
    from jdiffusion_lora.tiny import tiny_model_path

    env = {**os.environ, "PYTHONPATH": ROOT}
    lora_dir = tmp_path / "lora-run"
    setup = [sys.executable, "-m", "jdiffusion_lora.cli", "train", "--config", "configs/demo.toml",
             "--max-train-steps", "1", "--no-before-after", "--sample-every", "0", "--no-progress-bar",
             "--no-tensorboard", "--output-dir", str(lora_dir)]
    subprocess.run(setup, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    paths = {"tmp": str(tmp_path), "model": tiny_model_path(), "styles": os.path.join(ROOT, "styles"),
             "lora": str(lora_dir / "pytorch_lora_weights.safetensors")}
    os.makedirs(tmp_path / "no-scorer-weights", exist_ok=True)
    runs = [(line, command, *substitute(command, paths, previous))
            for line, command, previous, multi in _commands_to_run() if not multi]
    runs.sort(key=lambda r: RUN_ORDER.index(r[3]))   # stable: README order within a kind
    for line, command, argv, kind in runs:
        if argv[0] == "python":
            argv[0] = sys.executable
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (f"README.md line {line}: {command!r}\nran as {argv}\nexit {out.returncode}\n"
                                     f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
