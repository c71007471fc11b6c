"""Four tenant tasks with a deterministic, seeded generator and a scoring program each.

- `extract`: structured extraction of a customer message into JSON with fixed keys.
- `intent`: support-ticket intent classification over a fixed label set.
- `format`: a strict output-format rewrite of a payment record.
- `catalog`: facts about a made-up product catalogue (the base model cannot know them). The
  held-out split asks the same facts with a question phrasing never seen in training, so the
  score measures whether the facts were learned, not the phrasing.

Plus `general`: a fixed set of general-knowledge questions the base model answers correctly,
used as the forgetting check (its score before and after each fine-tune).

Every example is a chat record `{"task", "messages": [user, assistant]}`; the assistant turn is
the reference answer. Scores are in [0, 1] per example.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Record = dict


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    max_tokens: int  # generation budget at evaluation
    make: Callable[[random.Random, str], tuple[str, str]]  # (rng, split) -> (prompt, answer)
    score: Callable[[str, str], float]  # (prediction, reference) -> [0, 1]


def _norm(text: str) -> str:
    return " ".join(text.strip().split())


# --------------------------------------------------------------------------------------------
# extract: customer message -> JSON {"name", "email", "city", "order_id"}

FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Pedro",
    "Chloe",
    "Ivan",
    "Amara",
    "Tom",
    "Mei",
    "Omar",
    "Sofia",
    "Liam",
    "Nadia",
    "Yusuf",
    "Elena",
    "Kofi",
    "Hanna",
    "Raj",
]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Berg",
    "Khan",
    "Silva",
    "Martin",
    "Petrov",
    "Okafor",
    "Reed",
    "Chen",
    "Haddad",
    "Rossi",
    "Walsh",
    "Novak",
    "Demir",
    "Ivanova",
    "Mensah",
    "Larsen",
    "Patel",
]
CITIES = [
    "Denver",
    "Lyon",
    "Osaka",
    "Bergen",
    "Lahore",
    "Porto",
    "Quebec",
    "Kazan",
    "Lagos",
    "Leeds",
    "Xiamen",
    "Beirut",
    "Turin",
    "Galway",
    "Brno",
    "Izmir",
    "Minsk",
    "Accra",
    "Aarhus",
    "Pune",
]
DOMAINS = ["example.org", "mail.test", "inbox.example", "post.test"]
EXTRACT_TEMPLATES = [
    "Hi, this is {name} from {city}. You can reach me at {email} about order {order}.",
    "Order {order} has not arrived yet. I live in {city}. -- {name} ({email})",
    "Hello! My name is {name}, email {email}. I'm writing from {city} regarding order #{order}.",
    "{name} here ({city}). Please send the invoice for order {order} to {email}.",
    "Can someone check order no. {order}? Contact: {email}. Thanks, {name}, {city}",
]
EXTRACT_KEYS = ("name", "email", "city", "order_id")


def _make_extract(rng: random.Random, split: str) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower()}@{rng.choice(DOMAINS)}"
    city = rng.choice(CITIES)
    order = rng.randint(10000, 99999)
    text = rng.choice(EXTRACT_TEMPLATES).format(name=name, email=email, city=city, order=order)
    prompt = f"Extract JSON with keys name, email, city, order_id (integer).\n\n{text}"
    answer = json.dumps({"name": name, "email": email, "city": city, "order_id": order})
    return prompt, answer


def _score_extract(prediction: str, reference: str) -> float:
    """Share of the four fields that are exactly right; 0 unless the reply is a JSON object with
    exactly the fixed keys."""
    want = json.loads(reference)
    match = re.search(r"\{.*\}", prediction, re.S)
    if not match:
        return 0.0
    try:
        got = json.loads(match.group(0))
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(got, dict) or set(got) != set(EXTRACT_KEYS):
        return 0.0
    return sum(got[k] == want[k] for k in EXTRACT_KEYS) / len(EXTRACT_KEYS)


# --------------------------------------------------------------------------------------------
# intent: support ticket -> one label

INTENTS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {plan} plan this month.",
        "Why is my invoice for {month} higher than usual?",
        "My card was billed {amount} dollars but I expected less.",
        "Can you explain the extra fee on my {month} bill?",
    ],
    "login": [
        "I can't sign in, it says my password is wrong.",
        "The verification code never arrives when I try to log in on my {device}.",
        "My account is locked after too many login attempts.",
        "Password reset link is not working on my {device}.",
    ],
    "shipping": [
        "My package has been in transit for {days} days, where is it?",
        "The tracking number shows no updates since {month}.",
        "When will my order be delivered? It's been {days} days.",
        "The courier says the parcel was delivered but I never got it.",
    ],
    "refund": [
        "I returned the item {days} days ago and still have no refund.",
        "Please give me my money back for the broken {item}.",
        "How long does a refund take to reach my card?",
        "I want a refund for the {item} I sent back.",
    ],
    "bug_report": [
        "The app crashes every time I open the settings on my {device}.",
        "When I click export, the page freezes and shows an error.",
        "The {item} screen shows blank after the latest update.",
        "Search results are empty even though I have saved items.",
    ],
    "cancel_subscription": [
        "Please cancel my {plan} subscription at the end of the month.",
        "How do I stop my membership from renewing?",
        "I no longer need the {plan} plan, close it please.",
        "Cancel my account subscription, I'm switching providers.",
    ],
}
INTENT_LABELS = tuple(INTENTS)
SLOTS = {
    "plan": ["Pro", "Basic", "Family", "Team", "Premium"],
    "month": ["January", "March", "May", "August", "October", "December"],
    "amount": ["49", "120", "15", "89", "230"],
    "device": ["iPhone", "Android phone", "laptop", "tablet"],
    "days": ["5", "9", "12", "20"],
    "item": ["headphones", "blender", "keyboard", "lamp", "backpack"],
}
OPENERS = ["", "Hello, ", "Hi team, ", "Urgent: ", "Good morning. "]
CLOSERS = ["", " Thanks.", " Please help.", " Regards, a customer.", " This is frustrating."]


def _make_intent(rng: random.Random, split: str) -> tuple[str, str]:
    label = rng.choice(INTENT_LABELS)
    body = rng.choice(INTENTS[label])
    body = re.sub(r"\{(\w+)\}", lambda m: rng.choice(SLOTS[m.group(1)]), body)
    ticket = rng.choice(OPENERS) + body + rng.choice(CLOSERS)
    prompt = "Ticket label (" + ", ".join(INTENT_LABELS) + ")?\n\n" + ticket
    return prompt, label


def _score_intent(prediction: str, reference: str) -> float:
    return float(_norm(prediction).lower().strip(".") == reference)


# --------------------------------------------------------------------------------------------
# format: payment record -> "LAST, First | YYYY-MM-DD | 12.50 EUR"

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
FORMAT_TEMPLATES = [
    "{first} {last} paid {amount} euros on {month} {day}, {year}.",
    "Payment of {amount} EUR received from {first} {last} on {day} {month} {year}.",
    "On {month} {day}, {year}, {first} {last} transferred {amount} euro.",
    "first name: {first}; last name: {last}; date: {day} {month} {year}; amount: {amount}",
]


def _make_format(rng: random.Random, split: str) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    year, month, day = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    cents = rng.choice([0, 0, 50, 25, 99, rng.randint(1, 99)])
    whole = rng.randint(1, 999)
    amount = f"{whole}" if cents == 0 else f"{whole}.{cents:02d}".rstrip("0")
    text = rng.choice(FORMAT_TEMPLATES).format(
        first=first, last=last, amount=amount, month=MONTHS[month - 1], day=day, year=year
    )
    prompt = "Rewrite as: LASTNAME, Firstname | YYYY-MM-DD | 0.00 EUR\n\n" + text
    answer = f"{last.upper()}, {first} | {year:04d}-{month:02d}-{day:02d} | {whole}.{cents:02d} EUR"
    return prompt, answer


def _score_format(prediction: str, reference: str) -> float:
    return float(_norm(prediction).strip("`") == reference)


# --------------------------------------------------------------------------------------------
# catalog: facts about a made-up product catalogue

_SYLL = ["zor", "vex", "qua", "lim", "tra", "nox", "bel", "kir", "dru", "pha", "yel", "mon"]
_KINDS = ["drone", "kettle", "backpack", "speaker", "lamp", "bicycle", "watch", "tent"]
_COLORS = ["teal", "amber", "crimson", "ivory", "olive", "violet", "slate", "coral"]
CATALOG_SIZE = 16
# Phrasings per attribute: the first three are for training, the last one is held out.
CATALOG_QUESTIONS = {
    "price": [
        "How much does the {p} cost?",
        "What is the price of the {p}?",
        "Tell me the price of the {p}.",
        "If I buy a {p}, how many euros do I pay?",
    ],
    "color": [
        "What color is the {p}?",
        "Which color does the {p} come in?",
        "Tell me the color of the {p}.",
        "I'm ordering a {p}; what colour will it be?",
    ],
}


def catalog(seed: int = 7) -> list[dict]:
    """The made-up catalogue: fixed for a seed, independent of the split seeds."""
    rng = random.Random(seed)
    names: set[str] = set()
    items = []
    while len(items) < CATALOG_SIZE:
        word = (rng.choice(_SYLL) + rng.choice(_SYLL)).capitalize()
        name = f"{word} {rng.choice('KQXVZ')}{rng.randint(2, 9)} {rng.choice(_KINDS)}"
        if name in names:
            continue
        names.add(name)
        items.append({"name": name, "price": rng.randint(19, 499), "color": rng.choice(_COLORS)})
    return items


def _catalog_answer(item: dict, attribute: str) -> str:
    if attribute == "price":
        return f"The {item['name']} costs {item['price']} euros."
    return f"The {item['name']} is {item['color']}."


def _catalog_records(split: str) -> list[tuple[str, str]]:
    items = catalog()
    out = []
    for item in items:
        for attribute, phrasings in CATALOG_QUESTIONS.items():
            chosen = phrasings[:3] if split == "train" else phrasings[3:]
            for q in chosen:
                out.append((q.format(p=item["name"]), _catalog_answer(item, attribute)))
    return out


def _make_catalog(rng: random.Random, split: str) -> tuple[str, str]:
    return rng.choice(_catalog_records(split))


def _score_catalog(prediction: str, reference: str) -> float:
    """The key fact (the price number or the colour word) must appear in the answer."""
    fact = re.search(r"costs (\d+) euros|is (\w+)\.$", reference)
    assert fact is not None, reference
    key = fact.group(1) or fact.group(2)
    return float(re.search(rf"\b{re.escape(key)}\b", prediction.lower()) is not None)


# --------------------------------------------------------------------------------------------
# general: the forgetting check. Each question lists the accepted answer words (whole words).
# Kept: the questions the base SmolLM2-135M-Instruct answered correctly, greedy, in a check of
# 24 candidates (it failed Spain, largest planet, boiling point, bees, continents, ...).

GENERAL_QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the opposite of hot?", ("cold",)),
    ("Which ocean is the largest?", ("pacific",)),
    ("What is the main language spoken in Brazil?", ("portuguese",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
]


def _score_general(prediction: str, reference: str) -> float:
    text = prediction.lower()
    return float(any(re.search(rf"\b{re.escape(w)}\b", text) for w in reference.split("|")))


def general_records() -> list[Record]:
    """The fixed forgetting-check set; the reference is the accepted words joined by `|`."""
    return [
        {
            "task": "general",
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "|".join(words)},
            ],
        }
        for q, words in GENERAL_QUESTIONS
    ]


# --------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {
    "extract": Task(
        "extract", "structured extraction to JSON (4 fixed keys)", 64, _make_extract, _score_extract
    ),
    "intent": Task("intent", "support-ticket intent, 6 labels", 8, _make_intent, _score_intent),
    "format": Task("format", "strict one-line format rewrite", 32, _make_format, _score_format),
    "catalog": Task(
        "catalog", "facts about a made-up product catalogue", 24, _make_catalog, _score_catalog
    ),
}
GENERAL = Task(
    "general",
    "general knowledge the base model passes (forgetting)",
    40,
    lambda rng, split: ("", ""),
    _score_general,
)
TASK_NAMES = tuple(TASKS)
SPLIT_SEEDS = {"train": 1000, "eval": 2000}


def get_task(name: str) -> Task:
    if name == "general":
        return GENERAL
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join((*TASKS, 'general'))}") from None


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Record]:
    """`n` examples of `task` for `split` ("train" or "eval"), deterministic for `seed`.

    Held-out examples never repeat a training prompt (for `catalog`, a held-out question always
    uses the held-out phrasing)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}")
    spec = get_task(task)
    if task == "catalog":
        pool = _catalog_records(split)
        rng = random.Random(seed * 7919 + SPLIT_SEEDS[split])
        if split == "eval":  # every held-out fact once, in a seeded order
            pairs = rng.sample(pool, min(n, len(pool)))
        else:
            pairs = [pool[i % len(pool)] for i in range(n)]
            rng.shuffle(pairs)
    else:
        rng = random.Random(f"{task}:{split}:{seed}")
        exclude = set()
        if split == "eval":
            exclude = {
                r["messages"][0]["content"]
                for r in generate(task, "train", n_train_for_exclusion(), seed)
            }
        pairs, seen = [], set()
        while len(pairs) < n:
            prompt, answer = spec.make(rng, split)
            if prompt in exclude or (split == "eval" and prompt in seen):
                continue
            seen.add(prompt)
            pairs.append((prompt, answer))
    return [
        {
            "task": task,
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
        }
        for p, a in pairs
    ]


def n_train_for_exclusion() -> int:
    """Held-out prompts are checked against this many training prompts (the default size)."""
    return 2000


def write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def generate_all(
    out: Path,
    n_train: int = 600,
    n_eval: int = 40,
    seed: int = 0,
    tasks: tuple[str, ...] = TASK_NAMES,
) -> dict[str, dict[str, Path]]:
    """Write `out/<task>/{train,eval}.jsonl` for each task and `out/general/eval.jsonl`."""
    if n_train > n_train_for_exclusion():
        raise ValueError(f"n_train must be at most {n_train_for_exclusion()}")
    paths: dict[str, dict[str, Path]] = {}
    for task in tasks:
        paths[task] = {}
        for split, n in (("train", n_train), ("eval", n_eval)):
            path = out / task / f"{split}.jsonl"
            write_jsonl(path, generate(task, split, n, seed))
            paths[task][split] = path
    general = out / "general" / "eval.jsonl"
    write_jsonl(general, general_records())
    paths["general"] = {"eval": general}
    return paths
