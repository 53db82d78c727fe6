"""A search trial's side of pruning: training reports its held-out losses to its trial in the study's journal
and stops when the study's median pruner says so (finetune/search/study.py keeps the pruner's settings in
the study). Only the first process talks to the study; every process gets its answer.

Pruning compares a trial with the completed trials of the rounds before (Optuna's median pruner ignores
running ones), so the same history prunes the same trials.
"""
from pathlib import Path

from finetune.search.study import PRUNED_PREFIX, quiet_optuna, signed, storage


def waiting_trial(journal, number):
    """(the trial `number` of the study in the journal, with the study's median pruner; None when the trial is not
    running), and the study's direction."""
    optuna = quiet_optuna()
    if not Path(journal).exists():
        raise FileNotFoundError("no such journal")
    base = storage(journal)
    name = base.get_all_studies()[0].study_name
    settings = optuna.load_study(study_name=name, storage=base).user_attrs
    pruner = optuna.pruners.MedianPruner(n_startup_trials=settings["pruning_startup_trials"],
                                         n_warmup_steps=settings["pruning_warmup_steps"])
    study = optuna.load_study(study_name=name, storage=base, pruner=pruner)
    held = study.trials[number] if number < len(study.trials) else None
    if held is None or held.state != optuna.trial.TrialState.RUNNING:
        return None, settings["direction"]
    return optuna.trial.Trial(study, held._trial_id), settings["direction"]


class TrialPruning:
    """report(step, held_out_loss) -> why to stop (pruned: ...) or None."""

    def __init__(self, journal, number, say=print):
        self.trial = None
        try:
            self.trial, self.direction = waiting_trial(journal, number)
        except Exception as problem:  # no journal (its folder deleted), or one cut short: the trial trains on
            say(f"{journal}: {type(problem).__name__}: {problem}")
        if self.trial is None:
            say(f"trial {number} is not waiting for its result in {journal} (its round was told already, or the "
                "study cannot be read): training without pruning")

    def report(self, step, held_out_loss):
        if self.trial is None:
            return None
        self.trial.report(signed(self.direction, held_out_loss), step)
        if not self.trial.should_prune():
            return None
        return (f"{PRUNED_PREFIX}: held-out loss {held_out_loss:.4f} at step {step} is worse than the median of "
                "the completed trials at that step")
