"""The rewards of a GRPO run (training/grpo.py): built-in checks of a completion, and
functions of the project's own, combined by weight.

A run declares its rewards as a list; each item is a built-in's name, a project file's
function (`rewards.py:brevity`, relative to the project), or either as a mapping with a
`weight` (default 1) and the function's options:

    rewards:
      - exact_match
      - {reward: regex, pattern: "^[0-9]+$", weight: 0.5}
      - {reward: "my_rewards.py:brevity", limit: 20}

Every reward function takes the completions of a batch and returns one number per completion:

    def brevity(completions, references, prompts, tasks, completion_tokens, limit=20, **kwargs):
        return [1.0 if n <= limit else 0.0 for n in completion_tokens]

with `references` the records' answers (what evaluation compares with; "" where a record has
none), `prompts` the prompt texts, `tasks` the records' task kinds (or None) and
`completion_tokens` each completion's length in tokens. A reward that raises or returns
anything but one finite number per completion stops the run, naming the reward, the step and
the completion.
"""
import importlib.util
import math
import numbers
import re
from pathlib import Path

from finetune.evaluation.metrics import final_answer, is_exact_match

THINK_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def exact_match(completions, references, **kwargs):
    """1 where the completion's answer (after any <think> block) is the reference, as evaluation scores it."""
    return [float(bool(r.strip()) and is_exact_match(c, r)) for c, r in zip(completions, references)]


def regex(completions, pattern, **kwargs):
    """1 where the pattern matches somewhere in the completion's answer (anchor it with ^ and $ for all of it)."""
    compiled = re.compile(pattern)
    return [float(compiled.search(final_answer(c)) is not None) for c in completions]


def contains(completions, references, text=None, **kwargs):
    """1 where the completion holds `text` (default: the record's reference answer)."""
    return [float(bool(text or r.strip()) and (text or r.strip()) in c) for c, r in zip(completions, references)]


def length(completions, completion_tokens, limit, **kwargs):
    """0 up to `limit` tokens; past it, minus the share of tokens over the limit: -(n - limit) / limit."""
    return [-max(n - limit, 0) / limit for n in completion_tokens]


def think_format(completions, **kwargs):
    """1 where the completion opens with a closed <think>...</think> block followed by an answer."""
    return [float(THINK_FORMAT.match(c) is not None) for c in completions]


BUILT_IN = {"exact_match": exact_match, "regex": regex, "contains": contains, "length": length,
            "think_format": think_format}
REQUIRED_OPTIONS = {"regex": ("pattern",), "length": ("limit",)}


def reward_spec(item):
    """A declared reward as (name, weight, options)."""
    if isinstance(item, str):
        return item, 1.0, {}
    options = {key: value for key, value in item.items() if key not in ("reward", "weight")}
    return item["reward"], float(item.get("weight", 1.0)), options


def is_project_function(name):
    return ":" in name


def reward_files(rewards):
    """The project files whose functions the rewards name (inputs of the training job)."""
    return sorted({reward_spec(item)[0].split(":")[0] for item in rewards if is_project_function(reward_spec(item)[0])})


def reward_problems(rewards, project_dir="."):
    """Why the declared rewards cannot be used, as messages (checked before any job); [] if none."""
    found = []
    if not rewards:
        found.append("objective grpo needs at least one reward (rewards: [exact_match])")
    for item in rewards or []:
        name, _, options = reward_spec(item)
        if is_project_function(name):
            file, _, function = name.partition(":")
            if not file.endswith(".py") or not function.isidentifier():
                found.append(f"reward '{name}': a project function is FILE.py:FUNCTION")
            elif not (Path(project_dir) / file).is_file():
                found.append(f"reward '{name}': no file {file} in the project")
        elif name not in BUILT_IN:
            found.append(f"reward '{name}': not a built-in ({', '.join(BUILT_IN)}) nor FILE.py:FUNCTION")
        else:
            found += [f"reward '{name}' needs option '{option}'" for option in REQUIRED_OPTIONS.get(name, ())
                      if option not in options]
            if name == "regex" and "pattern" in options:
                try:
                    re.compile(options["pattern"])
                except (re.error, TypeError) as error:
                    found.append(f"reward 'regex': pattern {options['pattern']!r} is not a regular expression ({error})")
    return found


def load_function(name):
    """A project file's function, by FILE.py:FUNCTION; ValueError naming what is missing."""
    file, _, function = name.partition(":")
    if not Path(file).is_file():
        raise ValueError(f"reward '{name}': no file {file}")
    spec = importlib.util.spec_from_file_location(f"project_rewards.{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
        raise ValueError(f"reward '{name}': {file} defines no function {function}")
    return getattr(module, function)


def load_rewards(rewards):
    """[(name, weight, function, options)] of the declared rewards; ValueError naming a broken one."""
    problems = reward_problems(rewards)
    if problems:
        raise ValueError("; ".join(problems))
    loaded, seen = [], {}
    for item in rewards:
        name, weight, options = reward_spec(item)
        function = load_function(name) if is_project_function(name) else BUILT_IN[name]
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"  # two regex rewards log apart
        loaded.append((label, weight, function, options))
    return loaded


class RewardError(Exception):
    """A reward raised or returned something else than a number per completion."""


def checked_scores(name, scores, count):
    """The scores as floats; RewardError (with the position of the culprit, or None) when they are not numbers."""
    if isinstance(scores, (str, bytes)) or not hasattr(scores, "__len__") or len(scores) != count:
        raise RewardError(f"returned {type(scores).__name__} {str(scores)[:80]!r}, not a list of {count} numbers", None)
    values = []
    for position, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
            raise RewardError(f"returned {score!r} (a {type(score).__name__}), not a finite number", position)
        values.append(float(score))
    return values


def culprit(function, batch, options):
    """The first completion the function fails on when called alone (an exception it raises on a batch)."""
    for position in range(len(batch["completions"])):
        try:
            function(**{key: [values[position]] for key, values in batch.items()}, **options)
        except Exception:  # noqa: BLE001  any error of user code is what we look for
            return position
    return 0


def score(rewards, batch, step):
    """{name: [score per completion]} of every reward over a batch (completions, references, prompts, tasks,
    completion_tokens: one entry per completion). SystemExit naming the reward, step and completion on failure."""
    scores = {}
    for name, _, function, options in rewards:
        try:
            try:
                result = function(**batch, **options)
            except Exception as error:  # noqa: BLE001  user code: report what it raised, and where
                raise RewardError(f"raised {type(error).__name__}: {error}", culprit(function, batch, options))
            scores[name] = checked_scores(name, result, len(batch["completions"]))
        except RewardError as error:
            message, position = error.args
            where = "" if position is None else f" on completion {position} {batch['completions'][position]!r}"
            raise SystemExit(f"reward '{name}' {message} at step {step}{where}; nothing was written") from None
    return scores


def combined(rewards, scores):
    """Each completion's reward: the weighted sum of its scores."""
    count = len(next(iter(scores.values())))
    return [sum(weight * scores[name][i] for name, weight, _, _ in rewards) for i in range(count)]
