"""A search's Optuna study: proposing a round of trials and telling their results.

The study lives in an Optuna journal file (results/search/{name}/study.journal: append-only, locked, safe on
shared file systems), which the running trials read and write when they can be pruned. What a search has
learnt is also in its told files (one per round: every trial so far, its parameters, state, objective and
held-out losses), and the journal is kept equal to them: when it is not (a killed proposal, a round told
again after its trials retrained), it is rebuilt from them. Proposing is a function of the told trials and
the seed (the sampler is seeded per round), so a rerun proposes the same trials and retrains nothing.
"""
import json
import os
from pathlib import Path

from finetune.search.space import decoded, distributions, encoded, is_nan, objective_value, round_numbers

PRUNED_PREFIX = "pruned"  # how train_summary.json's stop_reason says a trial was pruned


def quiet_optuna():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage(journal):
    optuna = quiet_optuna()
    from optuna.storages.journal import JournalFileBackend
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))


def signed(direction, held_out_loss):
    """A held-out loss as an intermediate value of the study: the pruner compares them in its direction."""
    return held_out_loss if direction == "minimize" else -held_out_loss


def sampler_of(settings, round_number):
    """The round's sampler, seeded by the search's seed and the round: the same history proposes the same trials."""
    optuna = quiet_optuna()
    seed = (settings.seed * 1000 + round_number) % 2**32
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = settings.parallel if settings.startup_trials is None else settings.startup_trials
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def frozen(trial, space, direction):
    """A told trial as Optuna's FrozenTrial (to rebuild the journal)."""
    optuna = quiet_optuna()
    state = optuna.trial.TrialState[trial["state"]]
    intermediate = {int(step): signed(direction, loss) for step, loss in (trial.get("held_out_loss") or {}).items()}
    value = trial["value"] if trial["state"] == "COMPLETE" else None
    if trial["state"] == "PRUNED" and intermediate:
        value = intermediate[max(intermediate)]  # what study.tell records for a pruned trial
    return optuna.trial.create_trial(
        state=state, value=value, params={key: encoded(v) for key, v in trial["params"].items()},
        distributions=distributions(space), intermediate_values=intermediate,
        user_attrs={"round": trial["round"], "run": trial["run"]})


def agrees(study, trials):
    """Whether the study holds exactly these told trials (number, state, parameters; the objective if complete)."""
    def key(number, state, params, value):
        return number, state, json.dumps(params, sort_keys=True), value if state == "COMPLETE" else None

    held = [key(t.number, t.state.name, t.params, t.value) for t in study.trials]
    told = [key(t["number"], t["state"], {k: encoded(v) for k, v in t["params"].items()}, t["value"]) for t in trials]
    return held == told


def study_attributes(settings):
    return {"pruning": settings.pruning, "pruning_startup_trials": settings.pruning_startup_trials,
            "pruning_warmup_steps": settings.pruning_warmup_steps, "direction": settings.objective["direction"]}


def rebuild(journal, search, settings, trials):
    """Write the journal anew from the told trials (whole: written beside it, then renamed over it)."""
    optuna = quiet_optuna()
    partial = journal.with_name(journal.name + ".partial")
    partial.unlink(missing_ok=True)
    study = optuna.create_study(storage=storage(partial), study_name=search,
                                direction=settings.objective["direction"])
    for name, value in study_attributes(settings).items():
        study.set_user_attr(name, value)
    for trial in trials:
        study.add_trial(frozen(trial, settings.space, settings.objective["direction"]))
    os.replace(partial, journal)


def synced_study(journal, search, settings, trials, sampler=None, running=()):
    """The study, holding exactly the told trials (plus `running`, trial numbers asked but not told, when the
    journal has them with the same parameters); rebuilt from the told trials when it holds anything else."""
    optuna = quiet_optuna()
    journal = Path(journal)
    journal.parent.mkdir(parents=True, exist_ok=True)
    study = None
    if journal.exists():
        try:
            study = optuna.load_study(study_name=search, storage=storage(journal), sampler=sampler)
        except Exception as problem:  # unreadable (a write cut short), or another study: rebuilt below
            print(f"{journal}: {type(problem).__name__}: {problem}; rebuilding it from the told trials")
        if study and (not agrees(study, trials + list(running)) or study.user_attrs != study_attributes(settings)):
            study = None
    if study is None:
        rebuild(journal, search, settings, trials)
        study = optuna.load_study(study_name=search, storage=storage(journal), sampler=sampler)
    return study


def propose(settings, search, round_number, history, journal):
    """The round's trials, [{number, params}] (params as run settings), asked of the study."""
    numbers = round_numbers(settings.trials, settings.parallel, round_number)
    if len(history) != numbers[0]:
        raise ValueError(f"search '{search}': round {round_number} follows {numbers[0]} told trials, "
                         f"but the told file has {len(history)}")
    study = synced_study(journal, search, settings, history, sampler=sampler_of(settings, round_number))
    found = []
    for number in numbers:
        trial = study.ask(distributions(settings.space))
        if trial.number != number:
            raise RuntimeError(f"search '{search}': the study numbered a trial {trial.number}, expected {number}")
        trial.set_user_attr("round", round_number)
        found.append({"number": number, "params": decoded(settings.space, trial.params)})
    return found


def held_out_losses(metrics):
    """{step: held-out loss} of a trial's metrics rows (grpo: minus the held-out reward), as training selects."""
    found = {}
    for row in metrics:
        loss = row.get("eval_loss", -row["eval_reward"] if "eval_reward" in row else None)
        if loss is not None:
            found[str(row["step"])] = loss
    return found


def outcome(proposal, run, round_number, evaluation, summary, metrics, objective):
    """A trial's told record: COMPLETE with its objective, PRUNED (stopped by the pruner; its objective after
    stopping is kept but never the best), or FAIL (training failed, or the objective is not a number)."""
    told = {"number": proposal["number"], "run": run, "round": round_number, "params": proposal["params"],
            "state": "COMPLETE", "value": None, "error": None, "stop_reason": summary.get("stop_reason"),
            "held_out_loss": held_out_losses(metrics)}
    if evaluation.get("failed") or summary.get("failed"):
        failure = evaluation.get("failed") or summary.get("failed")
        return {**told, "state": "FAIL", "error": failure.get("error") if isinstance(failure, dict) else str(failure)}
    value = objective_value(evaluation, objective["metric"])
    if is_nan(value):
        return {**told, "state": "FAIL", "error": f"the objective {objective['metric']} is not a number"}
    pruned = str(told["stop_reason"] or "").startswith(PRUNED_PREFIX)
    return {**told, "state": "PRUNED" if pruned else "COMPLETE", "value": value}


def best_of(trials, direction):
    """The best complete trial (the first of equals), or None."""
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        return None
    sign = 1 if direction == "minimize" else -1
    best = min(complete, key=lambda t: (sign * t["value"], t["number"]))
    return {key: best[key] for key in ("number", "run", "params", "value")}


def tell(settings, search, round_number, history, told_now, journal):
    """Tell the study the round's results (their trials waiting in it are told as Optuna does; when the journal
    no longer has them waiting, they are added as told); the told file's content."""
    optuna = quiet_optuna()
    direction = settings.objective["direction"]
    study = synced_study(journal, search, settings, history,
                         running=[{**t, "state": "RUNNING", "value": None} for t in told_now])
    waiting = len(study.trials) == len(history) + len(told_now)
    for trial in told_now:
        if not waiting:
            study.add_trial(frozen(trial, settings.space, direction))
            continue
        held, record = study.trials[trial["number"]], frozen(trial, settings.space, direction)
        for step, value in record.intermediate_values.items():  # what training did not report (no pruning)
            if step not in held.intermediate_values:
                study._storage.set_trial_intermediate_value(held._trial_id, step, value)
        if trial["state"] == "COMPLETE":
            study.tell(trial["number"], trial["value"])
        else:
            study.tell(trial["number"], state=optuna.trial.TrialState[trial["state"]])
    trials = history + told_now
    synced_study(journal, search, settings, trials)
    return {"search": search, "objective": settings.objective, "rounds_told": round_number, "trials": trials,
            "best": best_of(trials, direction)}
