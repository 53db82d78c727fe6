"""Settings, declared once in schemas/config.schema.yaml and read from one file per stage.

Every setting is declared in the config schema: name, type, default, allowed
values and help. A setting that a stage receives names the stage's script in
`x-script`; that is the stage's *share* of the settings. The workflow writes
each share, resolved (defaults filled in), to a JSON file of its own (e.g.
results/runs/{run}/settings/train.json), and the stage reads it back as a typed,
frozen object whose fields are generated from the same declarations:

    settings = read_settings("results/runs/r8/settings/train.json", "train")
    settings.learning_rate        # 0.0002, a float; an undeclared name is an AttributeError

Adding a setting is one schema entry plus the line that uses it.
`x-learned: false` marks a training setting that does not change what a run
learns (logging, sampling, trackers): a checkpoint written under another
value still resumes (training/checkpoints.py).

    python -m finetune.settings train               # what train takes, with defaults
    python -m finetune.settings train r=8 > s.json  # a settings file for a hand-run stage
"""
import argparse
import dataclasses
import functools
import json
import sys
import typing
from pathlib import Path

import yaml

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
TOP_LEVEL = "config"  # the section name of settings declared at the top of the config (sweeps)
PYTHON_TYPES = {"integer": int, "number": float, "string": str, "boolean": bool, "array": list, "object": dict}


@functools.cache
def load_schema(schema_file=SCHEMA_FILE):
    return yaml.load(Path(schema_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def sections(schema):
    """(section, its declaration) of every config object the schema declares."""
    yield TOP_LEVEL, schema
    yield from schema["$defs"].items()


@functools.cache
def declared(stage, schema_file=SCHEMA_FILE):
    """{name: (section, declaration)} of the settings `stage` receives, in schema order."""
    found = {}
    for section, declaration in sections(load_schema(schema_file)):
        for name, spec in declaration.get("properties", {}).items():
            if stage not in spec.get("x-script", []):
                continue
            if name in found:
                raise ValueError(f"{stage} receives two settings named {name!r} "
                                 f"(in {found[name][0]} and {section}); rename one")
            found[name] = (section, spec)
    return found


def stages(schema_file=SCHEMA_FILE):
    """Every stage that receives settings, in the order the schema first names them."""
    names = [stage for _, declaration in sections(load_schema(schema_file))
             for spec in declaration.get("properties", {}).values() for stage in spec.get("x-script", [])]
    return list(dict.fromkeys(names))


def is_learned(spec):
    return spec.get("x-learned", True)


def default_of(spec, run):
    """A setting's default for this run: the declared one, or the one `x-default-for` names for its objective."""
    overrides = spec.get("x-default-for")
    return overrides.get((run or {}).get("objective", "sft"), spec.get("default")) if overrides else spec.get("default")


def fill_objective_defaults(run, schema_file=SCHEMA_FILE):
    """Set the run's settings whose default depends on its objective (x-default-for), where the run leaves them
    out; before validation fills in the declared defaults."""
    for name, spec in load_schema(schema_file)["$defs"]["run"]["properties"].items():
        if "x-default-for" in spec and name not in run:
            run[name] = default_of(spec, run)


def share(stage, schema_file=SCHEMA_FILE, **given):
    """The settings `stage` receives, from the config objects given by section (run=..., eval=...):
    each setting's value, or its declared default (None where it has none)."""
    values = {}
    for name, (section, spec) in declared(stage, schema_file).items():
        if section not in given:
            raise KeyError(f"{stage} needs the {section!r} section (for the setting {name!r})")
        values[name] = (given[section] or {}).get(name, default_of(spec, given.get("run")))
    return values


def python_type(spec):
    """The Python type a declaration describes (for the generated fields); Optional without a default."""
    def shape_type(shape):
        if "enum" in shape:
            return typing.Literal[tuple(shape["enum"])]
        if "const" in shape:
            return typing.Literal[shape["const"]]
        if "oneOf" in shape:
            alternatives = tuple(shape_type(alternative) for alternative in shape["oneOf"])
            return typing.Union[alternatives]
        return PYTHON_TYPES.get(shape.get("type"), typing.Any)
    kind = shape_type(spec)
    return kind if spec.get("default") is not None else typing.Optional[kind]


@functools.cache
def settings_class(stage, schema_file=SCHEMA_FILE):
    """A frozen dataclass with one typed field per setting `stage` receives."""
    fields = [(name, python_type(spec)) for name, (_, spec) in declared(stage, schema_file).items()]
    title = "".join(part.capitalize() for part in stage.split("_"))
    return dataclasses.make_dataclass(f"{title}Settings", fields, frozen=True)


def problems(stage, values, schema_file=SCHEMA_FILE):
    """Why `values` are not a valid share of `stage` (missing or unknown names, values out of range)."""
    import jsonschema

    settings = declared(stage, schema_file)
    found = [f"'{name}' is missing" for name in settings if name not in values]
    found += [f"'{name}' is not a setting of {stage}" for name in values if name not in settings]
    checker = jsonschema.Draft202012Validator({"properties": {name: spec for name, (_, spec) in settings.items()},
                                               "$defs": load_schema(schema_file)["$defs"]})  # what they refer to
    given = {name: value for name, value in values.items() if value is not None}
    found += [f"'{error.absolute_path[0]}': {error.message}" for error in checker.iter_errors(given)]
    return found


def typed(stage, values, schema_file=SCHEMA_FILE):
    """The share as its settings class; numbers declared as floats are floats."""
    settings = declared(stage, schema_file)
    numbers = {name for name, (_, spec) in settings.items() if spec.get("type") == "number"}
    return settings_class(stage, schema_file)(**{name: float(value) if name in numbers and value is not None
                                                 else value for name, value in values.items()})


def read_settings(path, stage, schema_file=SCHEMA_FILE):
    """A stage's settings file as its typed settings; exits naming the file and the setting when it is not one."""
    values = json.loads(Path(path).read_text())
    found = problems(stage, values, schema_file)
    if found:
        sys.exit(f"{path}: not the settings of {stage}: " + "; ".join(found))
    return typed(stage, values, schema_file)


def resolved(stage, schema_file=SCHEMA_FILE, **values):
    """The given values over the declared defaults of `stage`, checked; ValueError naming what is wrong."""
    defaults = {name: default_of(spec, values) for name, (_, spec) in declared(stage, schema_file).items()}
    settings = {**defaults, **values}
    found = problems(stage, settings, schema_file)
    if found:
        raise ValueError(f"settings of {stage}: " + "; ".join(found))
    return settings


def write_settings(path, stage, schema_file=SCHEMA_FILE, **values):
    """Write a settings file for `stage`: the given values over the declared defaults (for a hand-run stage)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(resolved(stage, schema_file, **values), indent=1) + "\n")
    return Path(path)


def run_conflicts(run):
    """Why a run's settings cannot go together (each one valid alone), as messages; [] if none.
    The config check calls it before any job, train.py on its settings file."""
    method, quantization = run["method"], run.get("quantization", "none")
    distributed, precision = run.get("distributed", "ddp"), run.get("precision", "auto")
    found = []
    if run.get("nodes", 1) > 1 and run.get("gpus", 0) < 1:
        found.append(f"nodes {run['nodes']} spans GPU nodes of a SLURM cluster: set gpus (GPUs on each node)")
    if method == "full" and quantization != "none":
        found.append(f"method full trains every weight and cannot load the base quantized (quantization "
                     f"{quantization}); use an adapter method or quantization none")
    if method == "qlora" and quantization == "8bit":
        found.append("qlora is LoRA on a 4bit base; for an 8bit base use method lora with quantization 8bit")
    for name, wanted in (("keep", run.get("keep") == "best"), ("early_stopping", bool(run.get("early_stopping")))):
        if wanted and not run.get("eval_every"):
            found.append(f"{name} compares held-out losses between evaluations: set eval_every (steps between them)")
    objective = run.get("objective", "sft")
    if objective not in ("sft", "grpo") and run.get("packing") == "on":
        found.append(f"objective {objective} compares whole answers row by row; packing applies to sft only "
                     "(use packing auto or off)")
    if objective in ("dpo", "ipo", "simpo", "kto") and run.get("beta", 0.1) <= 0:
        found.append(f"objective {objective} needs beta > 0 (it scales, or for ipo inverts, the rewards)")
    if objective == "grpo":
        found += grpo_conflicts(run)
    if objective == "kto" and run.get("batch_size", 8) < 2:
        found.append("kto estimates its KL term from the other completions of a micro-batch: set batch_size >= 2")
    if distributed == "fsdp":
        if method == "adalora":
            found.append("AdaLoRA reallocates ranks from whole adapter matrices, which FSDP splits over "
                         "processes; use distributed ddp, or method lora or dora")
        if quantization == "8bit":
            found.append("FSDP cannot split bitsandbytes' int8 weights; use qlora (4bit) or distributed ddp")
        if precision == "fp16":
            found.append("distributed fsdp trains in bf16 or fp32 (fp16 needs loss scaling it does not do); "
                         "use precision bf16, or distributed ddp")
    return found


def grpo_conflicts(run):
    found = []
    if run.get("method") == "adalora":
        found.append("objective grpo trains lora, qlora, dora or full (AdaLoRA's rank budget follows a "
                     "supervised schedule); use another method")
    if run.get("packing") == "on":
        found.append("objective grpo samples whole completions per prompt; packing applies to sft only")
    return found


def parse_value(text):
    """A value given as name=value on the command line: JSON where it parses, else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=stages(), help="a stage script's name, e.g. train")
    parser.add_argument("values", nargs="*", metavar="NAME=VALUE",
                        help="with values: print a settings file of the stage, these over the defaults")
    args = parser.parse_args(argv)
    if not args.values:
        for name, (section, spec) in declared(args.stage).items():
            print(f"{section}.{name}: {json.dumps(spec.get('default'))}  {spec.get('description', '')}")
        return
    values = dict(value.split("=", 1) for value in args.values)
    print(json.dumps(resolved(args.stage, **{name: parse_value(text) for name, text in values.items()}), indent=1))


if __name__ == "__main__":
    main()
