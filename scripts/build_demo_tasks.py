"""Rebuild the demo's task files (src/mergesmith/embedded/tasks/) from text that ships in packages.

Installs nothing. It reads what these packages put on disk; install them first:

    apt-get install fortunes fortunes-es fortunes-it wordnet-base
    pip install vaderSentiment==3.3.2

    python scripts/build_demo_tasks.py [--seed 0]

Every split is drawn with `random.Random(seed)` from sorted, deduplicated pools, so the same
package versions and seed give byte-identical files. Rows that share a group (a fortune's words,
a lexicon word's stem) never straddle two splits. SOURCES.md is written beside the tasks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "mergesmith" / "embedded" / "tasks"
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
SIZES = {"train": 800, "validation": 200, "test": 400}
MAX_LENGTH = 64

# Debian packages only: fortunes-de/-br/-pl/-cs/-ru are GPL, so German, Portuguese and the rest
# stay out of the committed data; these three are BSD, public domain and "presumed public domain".
TOPIC_FILES = {"computers": ["computers"], "love": ["love", "men-women"],
               "politics": ["politics"], "science": ["science"]}
LANGUAGE_FILES = {"english": ["people", "wisdom", "platitudes", "miscellaneous"],
                  "spanish": ["es/refranes.fortunes", "es/sabiduria.fortunes", "es/vida.fortunes"],
                  "italian": ["it/italia"]}
POS_FILES = {"noun": ["data.noun"], "verb": ["data.verb"], "adjective": ["data.adj"], "adverb": ["data.adv"]}

SOURCES = {
    "fortunes": ("deb", "BSD-3-Clause (fortune-mod; see /usr/share/doc/fortunes/copyright)"),
    "fortunes-es": ("deb", "fortune texts presumed public domain (the packaging code is GPL-2+; "
                           "see /usr/share/doc/fortunes-es/copyright)"),
    "fortunes-it": ("deb", "public domain (\"Consider this package freeware (public domain)\")"),
    "wordnet-base": ("deb", "WordNet 3.0 license (BSD-like, Princeton University)"),
    "vaderSentiment": ("pip", "MIT (C.J. Hutto)"),
}


def fortunes(relative: str) -> list[str]:
    """The file's fortunes as single-line texts, attributions ('-- Author') and overstrikes removed."""
    path = FORTUNES / relative
    if not path.is_file():
        sys.exit(f"{path} not found: apt-get install the fortunes packages named in this script's docstring")
    raw = path.read_bytes().decode("utf-8", errors="replace")
    texts = []
    for block in re.split(r"\n%\n", raw):
        block = re.sub(r".\x08", "", block)
        lines = []
        for line in block.splitlines():
            if re.match(r"\s*--\s", line) or line.strip() == "%":
                break
            lines.append(line)
        text = " ".join(" ".join(lines).split())
        if 4 <= len(text.split()) <= 40 and "\ufffd" not in text:
            texts.append(text)
    return texts


def topic_examples(rng: random.Random) -> list[tuple[str, str, str]]:
    return [(text, label, text) for label, files in TOPIC_FILES.items()
            for file in files for text in fortunes(file)]


def language_examples(rng: random.Random) -> list[tuple[str, str, str]]:
    """A short run of 2 to 5 words from each fortune: whole sentences would make it too easy."""
    examples = []
    for label, files in LANGUAGE_FILES.items():
        for file in files:
            for text in fortunes(file):
                words = text.split()
                width = rng.randint(2, 5)
                start = rng.randint(0, max(0, len(words) - width))
                examples.append((" ".join(words[start:start + width]), label, text))
    return examples


def sentiment_examples(rng: random.Random) -> list[tuple[str, str, str]]:
    """VADER's lexicon words whose mean human valence is clearly positive or negative (|v| >= 1)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("vaderSentiment is not installed: pip install vaderSentiment==3.3.2")
    lexicon = Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"
    examples = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, valence = line.split("\t")[:2]
        if re.fullmatch(r"[a-z]{3,}", word) and abs(float(valence)) >= 1.0:
            examples.append((word, "positive" if float(valence) > 0 else "negative", word[:5]))
    return examples


def pos_examples(rng: random.Random) -> list[tuple[str, str, str]]:
    """WordNet definitions (examples cut off), labelled with the part of speech they define."""
    examples = []
    for label, files in POS_FILES.items():
        for file in files:
            path = WORDNET / file
            if not path.is_file():
                sys.exit(f"{path} not found: apt-get install wordnet-base")
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("  ") or " | " not in line:
                    continue  # the licence header
                gloss = line.split(" | ", 1)[1]
                definition = re.split(r';\s*"|"', gloss, maxsplit=1)[0].strip(" ;")
                lemma = line.split()[4]
                if 3 <= len(definition.split()) <= 30:
                    examples.append((definition, label, lemma.lower()))
    return examples


def files(mapping: dict[str, list[str]]) -> str:
    return "; ".join(f"{label}: {', '.join(names)}" for label, names in mapping.items())


# name -> (builder, labels, description, what was derived from which files)
TASKS = {
    "topic": (topic_examples, list(TOPIC_FILES), "Topic of an English fortune cookie.",
              f"fortunes, {FORTUNES}/ ({files(TOPIC_FILES)}): one fortune per row, attributions removed, "
              "4-40 words"),
    "language": (language_examples, list(LANGUAGE_FILES), "Language of a 2-5 word snippet of a fortune cookie.",
                 f"fortunes, fortunes-es, fortunes-it, {FORTUNES}/ ({files(LANGUAGE_FILES)}): a random run "
                 "of 2-5 words of each fortune"),
    "sentiment": (sentiment_examples, ["negative", "positive"], "Polarity of an English word rated by humans.",
                  "vaderSentiment, vader_lexicon.txt: alphabetic words with mean human valence >= 1 "
                  "(positive) or <= -1 (negative); words sharing their first 5 letters stay in one split"),
    "part_of_speech": (pos_examples, list(POS_FILES), "Part of speech of the word a dictionary definition defines.",
                       f"wordnet-base, {WORDNET}/ ({files(POS_FILES)}): the definition part of each synset's "
                       "gloss (examples cut), 3-30 words; adjective satellites count as adjectives"),
}


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def make_splits(examples: list[tuple[str, str, str]], labels: list[str],
                rng: random.Random) -> dict[str, list[dict]]:
    """Balanced, deduplicated splits; a text seen under two labels is dropped; groups do not straddle."""
    seen: dict[str, tuple[str, str, str] | None] = {}
    for text, label, group in examples:
        key = normalized(text)
        if key in seen and seen[key] is not None and seen[key][1] != label:
            seen[key] = None
        elif key not in seen:
            seen[key] = (text, label, normalized(group))
    unique = [example for example in seen.values() if example is not None]
    groups = sorted({group for _, _, group in unique})
    rng.shuffle(groups)
    split_of, start, total = {}, 0, sum(SIZES.values())
    for split, size in SIZES.items():
        end = len(groups) if split == list(SIZES)[-1] else start + round(len(groups) * size / total)
        split_of.update({group: split for group in groups[start:end]})
        start = end
    splits = {}
    for split, size in SIZES.items():
        rows = []
        for label in labels:
            pool = [text for text, own, group in unique if own == label and split_of[group] == split]
            need = size // len(labels)
            if len(pool) < need:
                sys.exit(f"label {label!r} has {len(pool)} {split} examples, {need} needed")
            rows += [{"text": text, "label": label} for text in rng.sample(pool, need)]
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def package_version(name: str, kind: str) -> str:
    if kind == "pip":
        return importlib.metadata.version(name)
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                          check=True).stdout


def write_task(name: str, labels: list[str], description: str, splits: dict[str, list[dict]]) -> int:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "kind": "classification", "description": description,
            "data": {split: f"{split}.jsonl" for split in splits}, "text_field": "text",
            "label_field": "label", "labels": labels, "max_length": MAX_LENGTH, "metric": "accuracy"}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for split, rows in splits.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return sum(file.stat().st_size for file in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    sources = ["# Sources of the demo tasks", "",
               f"Built by `scripts/build_demo_tasks.py --seed {seed}`; splits "
               f"{'/'.join(map(str, SIZES.values()))} (train/validation/test), balanced labels.", "",
               "| package | kind | version | licence |", "| --- | --- | --- | --- |"]
    for package, (kind, licence) in SOURCES.items():
        sources.append(f"| {package} | {kind} | {package_version(package, kind)} | {licence} |")
    sources += ["", "| task | labels | derived from | size |", "| --- | --- | --- | --- |"]
    for offset, (name, (build, labels, description, derived)) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + offset)
        size = write_task(name, labels, description, make_splits(build(rng), labels, rng))
        sources.append(f"| {name} | {', '.join(labels)} | {derived} | {size / 1024:.0f} KiB |")
        print(f"{name}: {size / 1024:.0f} KiB")
    (OUT / "SOURCES.md").write_text("\n".join(sources) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
