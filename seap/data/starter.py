"""The built-in starter suite: small multiple-choice tasks generated from fact tables.

Needs no download. Each task is generated reproducibly from the tables and templates in
this module and a seed, and split into disjoint ``calibration`` and ``evaluation`` records
(the split is made on the underlying facts or operand pairs, so no fact is in both).
Records use the generic schema ``{"question", "choices", "answer"}``; a fact asked in several
templates also carries ``"group"`` (the country, the word pair, the word), so that items held
out of a split for selection are whole facts (:func:`seap.data.selection.split_train`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from seap.errors import SeapError

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi", "Brazil": "Brasilia", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Iceland": "Reykjavik",
    "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Czechia": "Prague",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Cuba": "Havana", "Jamaica": "Kingston", "New Zealand": "Wellington", "Ghana": "Accra",
    "Senegal": "Dakar", "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar", "Qatar": "Doha",
    "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman", "Tunisia": "Tunis", "Algeria": "Algiers",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asuncion", "Bolivia": "La Paz", "United Kingdom": "London", "Scotland": "Edinburgh", "Wales": "Cardiff",
}

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "early": "late",
    "young": "old", "strong": "weak", "rich": "poor", "open": "closed", "full": "empty", "high": "low", "hard": "soft",
    "wet": "dry", "loud": "quiet", "thick": "thin", "clean": "dirty", "long": "short", "wide": "narrow",
    "deep": "shallow", "sharp": "dull", "sweet": "sour", "cheap": "expensive", "safe": "dangerous", "easy": "difficult",
    "true": "false", "win": "lose", "buy": "sell", "push": "pull", "give": "take", "come": "go", "arrive": "leave",
    "begin": "end", "accept": "refuse", "increase": "decrease", "remember": "forget", "love": "hate", "laugh": "cry",
    "question": "answer", "friend": "enemy", "day": "night", "north": "south", "east": "west", "inside": "outside",
    "above": "below", "before": "after", "always": "never", "everything": "nothing", "first": "last", "left": "right",
    "good": "bad", "beautiful": "ugly", "brave": "cowardly", "polite": "rude", "generous": "selfish", "calm": "angry",
    "near": "far", "alive": "dead", "awake": "asleep", "victory": "defeat", "entrance": "exit", "maximum": "minimum",
    "ancient": "modern", "private": "public", "natural": "artificial", "simple": "complex", "major": "minor",
    "positive": "negative", "horizontal": "vertical", "visible": "invisible", "legal": "illegal", "patient": "impatient",
    "friendly": "hostile", "tight": "loose", "rough": "smooth", "raw": "cooked", "fresh": "stale", "wild": "tame",
}

CATEGORIES = {
    "an animal": ["dog", "cat", "horse", "lion", "tiger", "elephant", "rabbit", "wolf", "bear", "monkey", "giraffe",
                  "zebra", "camel", "goat", "sheep", "cow", "pig", "deer", "fox", "mouse", "whale", "dolphin", "eagle",
                  "owl", "parrot", "snake", "frog", "turtle", "shark", "penguin"],
    "a fruit": ["apple", "banana", "orange", "grape", "mango", "pear", "peach", "cherry", "lemon", "plum",
                "strawberry", "pineapple", "watermelon", "kiwi", "apricot", "papaya", "coconut", "fig", "lime",
                "raspberry", "blueberry", "melon", "pomegranate", "tangerine"],
    "a musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "clarinet",
                             "saxophone", "trombone", "banjo", "accordion", "ukulele", "oboe", "tuba", "harmonica",
                             "xylophone", "mandolin", "bagpipes"],
    "a color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
                "violet", "turquoise", "crimson", "indigo", "beige", "maroon", "navy", "teal", "magenta"],
    "a vehicle": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat", "ship",
                  "tram", "taxi", "scooter", "van", "tractor", "submarine", "canoe", "ambulance", "rocket", "yacht"],
    "a profession": ["doctor", "teacher", "lawyer", "engineer", "nurse", "farmer", "pilot", "chef", "baker",
                     "carpenter", "plumber", "dentist", "architect", "journalist", "scientist", "firefighter",
                     "electrician", "pharmacist", "librarian", "mechanic"],
    "a body part": ["hand", "foot", "head", "arm", "leg", "knee", "elbow", "shoulder", "finger", "toe", "nose",
                    "ear", "eye", "mouth", "neck", "chin", "ankle", "wrist", "heart", "lung"],
    "a piece of furniture": ["chair", "table", "sofa", "bed", "desk", "wardrobe", "bookshelf", "stool", "bench",
                             "dresser", "cabinet", "armchair", "couch", "cupboard", "nightstand", "ottoman"],
}

POSITIVE = ["wonderful", "excellent", "delightful", "fantastic", "brilliant", "lovely", "superb", "amazing",
            "enjoyable", "charming", "outstanding", "pleasant", "marvelous", "terrific", "great", "perfect"]
NEGATIVE = ["terrible", "awful", "boring", "horrible", "dreadful", "disappointing", "poor", "unpleasant",
            "miserable", "annoying", "bad", "dull", "mediocre", "painful", "disgusting", "useless"]
SUBJECTS = ["movie", "meal", "book", "concert", "hotel", "trip", "service", "game", "show", "class", "restaurant",
            "album", "play", "phone", "lecture", "party"]
SENTIMENT_TEMPLATES = [
    "The {s} was {a}.", "I thought the {s} was {a}.", "What a {a} {s}!", "Honestly, this {s} is {a}.",
    "Everyone agreed the {s} was {a}.", "My friends found the {s} {a}.",
]


def _split(items: list[Any], seed: int, eval_fraction: float = 0.5) -> tuple[list[Any], list[Any]]:
    items = list(items)
    random.Random(seed).shuffle(items)
    cut = int(round(len(items) * (1 - eval_fraction)))
    return items[:cut], items[cut:]


def _mc(question: str, correct: str, distractors: list[str], rng: random.Random,
        group: str | None = None) -> dict[str, Any]:
    choices = [correct, *distractors]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(correct),
            **({"group": group} if group is not None else {})}


def _capitals(seed: int) -> dict[str, list[dict[str, Any]]]:
    templates = ["The capital of {c} is", "The capital city of {c} is", "Which city is the capital of {c}? Answer:",
                 "{c} has its seat of government in", "Question: What is the capital of {c}? Answer:"]
    out = {}
    all_caps = sorted(set(CAPITALS.values()))
    for split, countries in zip(("calibration", "evaluation"), _split(sorted(CAPITALS), seed), strict=True):
        rng = random.Random(f"{seed}-capitals-{split}")
        records = []
        for country in countries:
            for template in templates:
                capital = CAPITALS[country]
                distractors = rng.sample([c for c in all_caps if c != capital], 3)
                records.append(_mc(template.format(c=country), capital, distractors, rng, group=country))
        out[split] = records
    return out


def _antonyms(seed: int) -> dict[str, list[dict[str, Any]]]:
    pairs = sorted(ANTONYMS.items())
    both = pairs + [(b, a) for a, b in pairs]
    templates = ["The opposite of \"{w}\" is", "An antonym of \"{w}\" is", "\"{w}\" means the opposite of",
                 "Question: What is the opposite of {w}? Answer:"]
    vocab = sorted({w for pair in pairs for w in pair})
    out = {}
    for split, words in zip(("calibration", "evaluation"), _split(both, seed), strict=True):
        rng = random.Random(f"{seed}-antonyms-{split}")
        records = []
        for word, opposite in words:
            for template in templates:
                distractors = rng.sample([w for w in vocab if w not in (word, opposite)], 3)
                records.append(_mc(template.format(w=word), opposite, distractors, rng,
                                   group="/".join(sorted((word, opposite)))))
        out[split] = records
    return out


def _arithmetic(seed: int) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(f"{seed}-arithmetic")
    problems = set()
    while len(problems) < 480:
        op = rng.choice("+-x")
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if op == "-" and b > a:
            a, b = b, a
        problems.add((a, op, b))
    templates = {"+": "{a} plus {b} equals", "-": "{a} minus {b} equals", "x": "{a} times {b} equals"}
    out = {}
    for split, items in zip(("calibration", "evaluation"), _split(sorted(problems), seed), strict=True):
        rng_split = random.Random(f"{seed}-arithmetic-{split}")
        records = []
        for a, op, b in items:
            value = a + b if op == "+" else a - b if op == "-" else a * b
            offsets = rng_split.sample([d for d in range(-10, 11) if d != 0 and value + d >= 0], 3)
            records.append(_mc(templates[op].format(a=a, b=b), str(value), [str(value + d) for d in offsets], rng_split))
        out[split] = records
    return out


def _sentiment(seed: int) -> dict[str, list[dict[str, Any]]]:
    items = [(s, a, "positive") for s in SUBJECTS for a in POSITIVE] + [(s, a, "negative") for s in SUBJECTS for a in NEGATIVE]
    out = {}
    for split, chosen in zip(("calibration", "evaluation"), _split(items, seed), strict=True):
        rng = random.Random(f"{seed}-sentiment-{split}")
        records = []
        for subject, adjective, label in chosen:
            text = rng.choice(SENTIMENT_TEMPLATES).format(s=subject, a=adjective)
            records.append({"question": f"Review: {text} The sentiment of this review is",
                            "choices": ["negative", "positive"], "answer": int(label == "positive")})
        out[split] = records
    return out


def _categories(seed: int) -> dict[str, list[dict[str, Any]]]:
    items = sorted((word, cat) for cat, words in CATEGORIES.items() for word in words)
    templates = ["{W} is", "In one word, {w} is", "Question: What kind of thing is {w}? Answer: it is"]
    names = sorted(CATEGORIES)
    out = {}
    for split, chosen in zip(("calibration", "evaluation"), _split(items, seed), strict=True):
        rng = random.Random(f"{seed}-categories-{split}")
        records = []
        for word, cat in chosen:
            for template in templates:
                distractors = rng.sample([c for c in names if c != cat], 3)
                article = "an" if word[0] in "aeiou" else "a"
                phrase = f"{article} {word}"
                records.append(_mc(template.format(w=phrase, W=phrase.capitalize()), cat, distractors, rng, group=word))
        out[split] = records
    return out


STARTER_TASKS: dict[str, Callable[[int], dict[str, list[dict[str, Any]]]]] = {
    "capitals": _capitals,
    "antonyms": _antonyms,
    "arithmetic": _arithmetic,
    "sentiment": _sentiment,
    "categories": _categories,
}
SPLITS = ("calibration", "evaluation")


def starter_records(task: str, split: str = "calibration", seed: int = 0) -> list[dict[str, Any]]:
    """The records of one starter task and split (deterministic for a seed)."""
    if task not in STARTER_TASKS:
        raise SeapError(f"unknown starter task {task!r}", f"starter tasks are: {', '.join(STARTER_TASKS)}")
    if split not in SPLITS:
        raise SeapError(f"unknown split {split!r}", f"use one of: {', '.join(SPLITS)}")
    return STARTER_TASKS[task](seed)[split]


def starter_calibration_records(tasks: list[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Calibration records of several starter tasks, each tagged with its ``"task"``."""
    out = []
    for task in tasks or list(STARTER_TASKS):
        out.extend({"task": task, **r} for r in starter_records(task, "calibration", seed))
    return out


STARTER_FILES = (("calibration", "train.jsonl"), ("evaluation", "validation.jsonl"))


def starter_files(seed: int = 0, tasks: Sequence[str] | None = None) -> dict[str, str]:
    """``{"<task>/train.jsonl": text, "<task>/validation.jsonl": text}``: the starter suite as
    a ``jsonl`` task folder (sorted-key JSON lines), byte for byte what ``starter:`` tasks use."""
    import json

    files = {}
    for task in tasks or list(STARTER_TASKS):
        for split, file in STARTER_FILES:
            files[f"{task}/{file}"] = "".join(json.dumps(r, sort_keys=True) + "\n"
                                              for r in starter_records(task, split, seed))
    return files


def starter_export(folder: Path) -> str | None:
    """``"a starter-suite export"`` when every file under ``folder`` is one :func:`export_starter`
    writes (a split file of a starter task), else None."""
    names = {f"{task}/{file}" for task in STARTER_TASKS for _, file in STARTER_FILES}
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return "a starter-suite export" if found and set(found) <= names else None


def export_starter(out: str | Path, seed: int = 0, tasks: Sequence[str] | None = None,
                   overwrite: bool = False) -> dict[str, int]:
    """Write the built-in starter suite as a ``jsonl`` task folder (``OUT/<task>/train.jsonl`` and
    ``validation.jsonl``, records ``{"question", "choices", "answer"}``), atomically and
    deterministically; returns the record count per file."""
    from seap.io import atomic_directory

    files = starter_files(seed, tasks)
    with atomic_directory(out, overwrite=overwrite, recognise=starter_export) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return {rel: text.count("\n") for rel, text in files.items()}
