"""Generate the example data shipped in data/ (run once; the output is committed).

- word_tasks.jsonl, number_tasks.jsonl: alpaca records of small rule-based
  tasks, each labelled with its task kind, all distinct, so that a held-out
  record is never a training record.
- pretrain_corpus.jsonl: plain-text documents (completion records) that teach
  the same skills in other surface forms: which word of a list comes first,
  last or after another, how many words a list has, which of two numbers is
  larger or smaller, and what number comes next. No document states the
  answer to a task record's input (the lists and number pairs of the task
  files are left out), so what a run gets right on held-out records it got by
  following the instruction, not by recall. The workflow trains the tiny
  model's tokenizer on it and pretrains the model on it.
- preference_train.jsonl, preference_eval.jsonl: the task records as preference pairs
  (config/preference.yaml): chosen the right answer, rejected a wrong one of the same form.

    python scripts/make_example_data.py --out data
"""
import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger maple ocean candle silver forest window garden "
    "pepper rocket violin meadow copper lantern harbor pencil thunder velvet "
    "falcon orange marble island shadow crystal bridge planet summer winter "
    "autumn spring yellow purple green blue red black white coffee honey "
    "mountain valley desert castle dragon wizard basket mirror ladder engine"
).split()

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MAX_NUMBER = 49


def number_in_words(n):
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens] if ones == 0 else f"{TENS[tens]}-{ONES[ones]}"


# ---------------------------------------------------------------- task records
# Inputs are labelled ("List: ...", "Numbers: ...") and answers are sentences
# that never start with a word of the input, so every word and number is
# written after a space wherever it appears: a byte-level BPE tokenizer gives
# " stone" and "stone" different tokens, and a tiny model copies only the same.

def word_list(rng):
    return rng.sample(WORDS, rng.randint(3, 6))


def word_task(kind, rng):
    """(instruction, input, output) of one word task of the given kind."""
    words = word_list(rng)
    text = f"List: {' '.join(words)}"
    if kind == "first_word":
        return "What is the first word?", text, f"The first word is {words[0]}."
    if kind == "last_word":
        return "What is the last word?", text, f"The last word is {words[-1]}."
    if kind == "word_after":
        i = rng.randrange(len(words) - 1)
        return f"Which word comes after {words[i]}?", text, f"After {words[i]} comes {words[i + 1]}."
    return "How many words are there?", text, f"There are {number_in_words(len(words))} words."


def number_task(kind, rng):
    a, b = rng.sample(range(MAX_NUMBER + 1), 2)
    pair = f"Numbers: {a} and {b}"
    if kind == "larger":
        return "Which number is larger?", pair, f"The larger number is {max(a, b)}."
    if kind == "smaller":
        return "Which number is smaller?", pair, f"The smaller number is {min(a, b)}."
    return "What number comes next?", f"Number: {a}", f"After {a} comes {a + 1}."


# Records per task kind (a successor has one record per number).
WORD_KINDS = {"first_word": 600, "last_word": 600, "count_words": 600, "word_after": 600}
NUMBER_KINDS = {"larger": 400, "smaller": 400, "successor": MAX_NUMBER + 1}


def task_records(make_task, kinds, rng):
    """Distinct records, `kinds[kind]` of each kind, shuffled."""
    records = []
    for kind, count in kinds.items():
        seen = set()
        while len(seen) < count:
            instruction, task_input, output = make_task(kind, rng)
            if (instruction, task_input) not in seen:
                seen.add((instruction, task_input))
                records.append({"instruction": instruction, "input": task_input, "output": output, "task": kind})
    rng.shuffle(records)
    return records


# ---------------------------------------------------------------- pretraining corpus
# Prose about lists and numbers: which word of a list comes first, last or after
# another, how many words there are, which of two numbers is larger or smaller,
# and what number comes next, in varied wording. Lists are often repeated,
# which teaches the model to copy from its context.

def list_sentences(words, rng):
    text, count = " ".join(words), number_in_words(len(words))
    i = rng.randrange(len(words) - 1)
    return rng.sample([
        f"The list {text} starts with {words[0]}.",
        f"In {text} the first word is {words[0]} and the last word is {words[-1]}.",
        f"The list {text} ends with {words[-1]}.",
        f"Counting {text} gives {count} words.",
        f"There are {count} words in {text}.",
        f"What comes first in {text} is {words[0]}, and what comes last is {words[-1]}.",
        f"We read {text} and then read it again: {text}.",
        f"In {text}, after {words[i]} comes {words[i + 1]}.",
        f"Which word follows {words[i]} in {text}? It is {words[i + 1]}.",
        f"List: {text}. Its first word is {words[0]}, its last word is {words[-1]}.",
        f"List: {text}. Here {words[i + 1]} comes after {words[i]}.",
    ], rng.randint(2, 4))


def pair_sentence(a, b, rng):
    big, small = max(a, b), min(a, b)
    return rng.choice([f"Of {a} and {b}, {big} is larger and {small} is smaller.",
                       f"The larger number of {a} and {b} is {big}.", f"The smaller number of {a} and {b} is {small}.",
                       f"{big} is more than {small}, and {small} is less than {big}."])


def number_sentence(n, rng):
    return rng.choice([f"After {n} comes {n + 1}.", f"The number that comes next after {n} is {n + 1}.",
                       f"Counting on from {n} gives {n + 1}."])


def corpus_document(rng, used_lists, used_pairs):
    """A few sentences of mixed facts; none about a list or number pair that a task record uses."""
    sentences, count = [], rng.randint(5, 8)
    while len(sentences) < count:
        kind = rng.choice(["list", "list", "pair", "pair", "number"])
        if kind == "list":
            words = word_list(rng)
            if " ".join(words) not in used_lists:
                sentences += list_sentences(words, rng)
        elif kind == "pair":
            a, b = rng.sample(range(MAX_NUMBER + 1), 2)
            if frozenset((a, b)) not in used_pairs:
                sentences.append(pair_sentence(a, b, rng))
        else:
            sentences.append(number_sentence(rng.randint(0, MAX_NUMBER), rng))
    return " ".join(sentences)


# ---------------------------------------------------------------- preference pairs
# Each task record as a pair for preference tuning: the chosen answer is the record's,
# the rejected one a wrong answer of the same form (another word of the list, the other
# number, a wrong count or successor). A pair is held out exactly when its record is held
# out of SFT (the split the workflow gives it by default: a stable hash of the record,
# eval.fraction 0.1), so no held-out pair's prompt was trained on by the SFT run either.

def wrong_answer(record, rng):
    words = record["input"].removeprefix("List: ").split()
    output, kind = record["output"], record["task"]
    if kind in ("first_word", "last_word"):
        right = words[0] if kind == "first_word" else words[-1]
        return output.replace(f" {right}.", f" {rng.choice([w for w in words if w != right])}.")
    if kind == "word_after":
        before, right = output.removeprefix("After ").removesuffix(".").split(" comes ")
        return f"After {before} comes {rng.choice([w for w in words if w not in (before, right)])}."
    if kind == "count_words":
        right = len(words)
        return f"There are {number_in_words(rng.choice([n for n in range(2, 8) if n != right]))} words."
    if kind in ("larger", "smaller"):
        a, b = map(int, record["input"].removeprefix("Numbers: ").split(" and "))
        right = max(a, b) if kind == "larger" else min(a, b)
        return output.replace(f" {right}.", f" {a + b - right}.")
    n = int(record["input"].removeprefix("Number: "))
    return f"After {n} comes {rng.choice([n + 2, n - 1] if n > 0 else [n + 2])}."


def preference_pairs(records, rng, eval_fraction=0.1):
    """(train pairs, held-out pairs) of the task records."""
    from finetune.data.tokenization import in_eval_split
    from finetune.data.validation import normalize
    train, held_out = [], []
    for record in records:
        pair = {"instruction": record["instruction"], "input": record["input"], "chosen": record["output"],
                "rejected": wrong_answer(record, rng), "task": record["task"]}
        held_out_of_sft = in_eval_split(normalize(record, "alpaca")["id"], eval_fraction)
        (held_out if held_out_of_sft else train).append(pair)
    return train, held_out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--documents", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    words = task_records(word_task, WORD_KINDS, rng)
    numbers = task_records(number_task, NUMBER_KINDS, rng)
    rng = random.Random(f"corpus-{args.seed}")  # the corpus does not change with the number of task records
    write_jsonl(args.out / "word_tasks.jsonl", words)
    write_jsonl(args.out / "number_tasks.jsonl", numbers)
    used_lists = {r["input"].removeprefix("List: ") for r in words if r["input"].startswith("List: ")}
    used_pairs = {frozenset(map(int, r["input"].removeprefix("Numbers: ").split(" and ")))
                  for r in numbers if r["input"].startswith("Numbers: ")}
    write_jsonl(args.out / "pretrain_corpus.jsonl",
                ({"text": corpus_document(rng, used_lists, used_pairs)} for _ in range(args.documents)))
    train_pairs, held_out_pairs = preference_pairs(words + numbers, random.Random(f"pairs-{args.seed}"))
    write_jsonl(args.out / "preference_train.jsonl", train_pairs)
    write_jsonl(args.out / "preference_eval.jsonl", held_out_pairs)


if __name__ == "__main__":
    main()
