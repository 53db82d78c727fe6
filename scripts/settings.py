"""Settings on the command line, declared once in schemas/config.schema.yaml.

Every setting that a stage script receives is declared in the config schema
with its type, default, allowed values and help, and names its scripts in
`x-script`. The rules turn a run's (validated) settings into flags with
`command_line_flags`; each script builds the matching arguments with
`add_settings` and checks what it parsed against the same declarations with
`check_settings`. Adding a setting is one entry in the schema plus the line
that uses it.

    python scripts/settings.py train     # the settings train.py takes, with defaults
"""
import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

import yaml

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


@functools.cache
def load_schema(path=SCHEMA_FILE):
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def script_settings(script):
    """{name: (section, declaration)} of the settings `script` receives, in schema order.
    A section is a config object declared under the schema's $defs (run, eval, dataset, ...)."""
    found = {}
    for section, declaration in load_schema()["$defs"].items():
        for name, spec in declaration.get("properties", {}).items():
            if script not in spec.get("x-script", []):
                continue
            if name in found:
                raise ValueError(f"{script} receives two settings named {name!r} "
                                 f"(in {found[name][0]} and {section}); rename one")
            found[name] = (section, spec)
    return found


def value_kind(spec):
    """How a setting travels as flags: 'bool' (--x/--no-x), 'list' (--x a b), 'json' or 'scalar'."""
    if spec.get("type") == "boolean":
        return "bool"
    shapes = [spec] + spec.get("oneOf", [])
    if any(s.get("type") == "array" and s.get("items", {}).get("type") == "string" for s in shapes):
        return "list"
    if any(s.get("type") in ("array", "object") for s in shapes):
        return "json"
    return "scalar"


def as_declared(spec, value):
    """A list setting given as one word that is a `const` alternative (e.g. all-linear) is that constant."""
    constants = [shape["const"] for shape in spec.get("oneOf", []) if "const" in shape]
    return value[0] if isinstance(value, list) and len(value) == 1 and value[0] in constants else value


PARSERS = {"integer": int, "number": float, "string": str}


def argument_options(spec, required):
    """argparse options for one declaration."""
    kind = value_kind(spec)
    help_text = spec.get("description", "")
    if "default" in spec:
        help_text += f" (default: {json.dumps(spec['default'])})"
    options = {"help": help_text, "default": spec.get("default")}
    if required and "default" not in spec:
        options["required"] = True
    if kind == "bool":
        options["action"] = argparse.BooleanOptionalAction
    elif kind == "list":
        options["nargs"] = "+"
    elif kind == "json":
        options["type"] = json.loads
    elif "enum" in spec:
        options["choices"] = spec["enum"]
    else:
        options["type"] = PARSERS[spec["type"]]
    return options


def add_settings(parser, script):
    """Add an argument for every setting `script` receives, as declared in the schema."""
    group = parser.add_argument_group("settings (declared in schemas/config.schema.yaml)")
    schema = load_schema()
    for name, (section, spec) in script_settings(script).items():
        required = name in schema["$defs"][section].get("required", [])
        group.add_argument(f"--{name.replace('_', '-')}", **argument_options(spec, required))
    return parser


def check_settings(args, script):
    """Hold parsed settings to the schema's ranges and patterns, as the config is held."""
    import jsonschema

    settings = script_settings(script)
    values = {name: as_declared(spec, getattr(args, name)) for name, (_, spec) in settings.items()
              if getattr(args, name) is not None}
    schema = {"type": "object", "properties": {name: spec for name, (_, spec) in settings.items()}}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(values))
    if error is not None:
        name = error.absolute_path[0] if error.absolute_path else "settings"
        sys.exit(f"--{str(name).replace('_', '-')}: {error.message}")
    return args


def command_line_flags(script, **sections):
    """The flags that pass `script` its settings, taken from the given config objects
    (e.g. run=..., base_model=...); a setting a section does not hold is left out."""
    parts = []
    for name, (section, spec) in script_settings(script).items():
        if section not in sections:
            raise KeyError(f"the rule for {script} must pass the {section!r} section (for the setting {name!r})")
        if name not in sections[section]:
            continue
        value, flag = sections[section][name], f"--{name.replace('_', '-')}"
        kind = value_kind(spec)
        if kind == "bool":
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif kind == "list":
            parts.append(" ".join([flag] + [shlex.quote(str(v)) for v in ([value] if isinstance(value, str) else value)]))
        elif kind == "json":
            parts.append(f"{flag} {shlex.quote(json.dumps(value, sort_keys=True))}")
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def run_conflicts(run):
    """Why a run's settings cannot go together (each one valid alone), as messages; [] if none.
    The config check calls it before any job, train.py on its own command line."""
    method, quantization = run["method"], run.get("quantization", "none")
    distributed, precision = run.get("distributed", "ddp"), run.get("precision", "auto")
    problems = []
    if run.get("nodes", 1) > 1 and run.get("gpus", 0) < 1:
        problems.append(f"nodes {run['nodes']} spans GPU nodes of a SLURM cluster: set gpus (GPUs on each node)")
    if method == "full" and quantization != "none":
        problems.append(f"method full trains every weight and cannot load the base quantized (quantization "
                        f"{quantization}); use an adapter method or quantization none")
    if method == "qlora" and quantization == "8bit":
        problems.append("qlora is LoRA on a 4bit base; for an 8bit base use method lora with quantization 8bit")
    for name, wanted in (("keep", run.get("keep") == "best"), ("early_stopping", bool(run.get("early_stopping")))):
        if wanted and not run.get("eval_every"):
            problems.append(f"{name} compares held-out losses between evaluations: set eval_every (steps between them)")
    if distributed == "fsdp":
        if method == "adalora":
            problems.append("AdaLoRA reallocates ranks from whole adapter matrices, which FSDP splits over "
                            "processes; use distributed ddp, or method lora or dora")
        if quantization == "8bit":
            problems.append("FSDP cannot split bitsandbytes' int8 weights; use qlora (4bit) or distributed ddp")
        if precision == "fp16":
            problems.append("distributed fsdp trains in bf16 or fp32 (fp16 needs loss scaling it does not do); "
                            "use precision bf16, or distributed ddp")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="a stage script's name, e.g. train")
    args = parser.parse_args()
    for name, (section, spec) in script_settings(args.script).items():
        print(f"{section}.{name}: {json.dumps(spec.get('default'))}  {spec.get('description', '')}")


if __name__ == "__main__":
    main()
