"""Generate the example dataset shipped in data/ (run once; the output is committed).

Two alpaca-style files of small, rule-based tasks that a tiny model can learn
in a few hundred steps, plus a text corpus of the same kind for training the
tiny model's tokenizer:

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


def number_in_words(n):
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens] if ones == 0 else f"{TENS[tens]}-{ONES[ones]}"


def word_task(rng):
    words = rng.sample(WORDS, rng.randint(3, 6))
    text = " ".join(words)
    kind = rng.choice(["reverse", "sort", "first", "last", "count", "upper"])
    if kind == "reverse":
        return "Reverse the order of these words.", text, " ".join(reversed(words))
    if kind == "sort":
        return "Sort these words alphabetically.", text, " ".join(sorted(words))
    if kind == "first":
        return "What is the first word?", text, words[0]
    if kind == "last":
        return "What is the last word?", text, words[-1]
    if kind == "count":
        return "How many words are there?", text, number_in_words(len(words))
    return "Write these words in capital letters.", text, text.upper()


def number_task(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    kind = rng.choice(["add", "larger", "smaller", "words", "double"])
    if kind == "add":
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    if kind == "larger":
        return "Which number is larger?", f"{a} or {b}", str(max(a, b))
    if kind == "smaller":
        return "Which number is smaller?", f"{a} or {b}", str(min(a, b))
    if kind == "words":
        return "Write the number in words.", str(a), number_in_words(a)
    return "Double the number.", str(a), str(2 * a)


def write_jsonl(path, make_task, count, rng):
    """`count` distinct records."""
    seen = set()
    with open(path, "w", encoding="utf-8") as f:
        while len(seen) < count:
            task = make_task(rng)
            if task not in seen:
                seen.add(task)
                instruction, task_input, output = task
                f.write(json.dumps({"instruction": instruction, "input": task_input, "output": output}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--records-per-file", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(args.out / "word_tasks.jsonl", word_task, args.records_per_file, rng)
    write_jsonl(args.out / "number_tasks.jsonl", number_task, args.records_per_file, rng)
    with open(args.out / "tokenizer_corpus.txt", "w", encoding="utf-8") as f:
        for _ in range(2000):
            instruction, task_input, output = rng.choice([word_task, number_task])(rng)
            f.write(f"{instruction}\n{task_input}\n{output}\n")


if __name__ == "__main__":
    main()
