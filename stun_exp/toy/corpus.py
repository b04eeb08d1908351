"""Seeded synthetic multi-domain corpus for the toy MoE.

Five domains give the experts something to specialise in: GSM8K-style arithmetic word problems
(``#### <answer>`` line; 40% of them written as bare drills ``Compute 23+45.``), facts about an
invented world (statements and Q/A; a quarter of the facts appear only as statements), number
comparison, string operations (copy/reverse/sort) and templated sentences.

Held-out split: an item is *held out* when a salted hash of its question text falls in one
bucket out of ``HELDOUT_MOD``. Training generators reject held-out items and evaluation generators
accept only them, so eval arithmetic/comparison questions never appear in training text, for any
number of generated documents. Facts are the exception by design: the world is finite, so the
fact task probes memorised knowledge (75% of facts are also asked as Q/A in training, 25% only
stated). Everything is a pure function of ``seed``: same seed, same text.

Why this mix: with arith 40 / facts 20 / compare 15 / strings 15 / sentences 10, arithmetic reached
only 19-31% exact match at 1400 steps over three seeds, and the string domain is never learned; so
arithmetic gets 50% (40% of it as drills, which carry more arithmetic per token) and
strings/sentences 7.5% each.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

DOMAINS = ("arithmetic", "facts", "compare", "strings", "sentences")
DEFAULT_MIX = {"arithmetic": 0.50, "facts": 0.20, "compare": 0.15, "strings": 0.075, "sentences": 0.075}
DRILL_FRAC = 0.4  # share of arithmetic documents written as bare expressions (denser arithmetic signal)
HELDOUT_MOD = 8  # 1 in 8 question keys is reserved for evaluation
N_COUNTRIES = 50
STATEMENT_ONLY_FRAC = 0.25

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Max", "Emma", "Leo", "Zoe", "Jack", "Ivy",
         "Noah", "Lily", "Omar", "Rosa", "Finn", "Nina", "Hugo", "Cleo"]
OBJECTS = ["apples", "books", "coins", "stamps", "pencils", "marbles", "cards", "shells", "cookies",
           "stickers", "rocks", "flowers", "buttons", "candles", "keys"]
ADD_VERBS = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
SUB_VERBS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
ANIMALS = ["otter", "falcon", "bison", "lynx", "heron", "panda", "gecko", "moose", "koala", "raven",
           "tapir", "zebra", "camel", "crane", "walrus", "beaver", "cobra", "hare", "ibis", "yak"]
CURRENCIES = ["lune", "dorn", "pell", "vask", "quill", "marn", "sol", "tarn", "bex", "crown", "ferl",
              "gild"]
SYLLABLES = ["zor", "vi", "ka", "mel", "tor", "ba", "ri", "dun", "sa", "lo", "fen", "gar", "el",
             "mo", "ta", "quin", "ra", "bel", "no", "xa", "pre", "dal", "ki", "vor", "un"]
RELATIONS = ("capital", "language", "animal", "currency")
PLACES = ["park", "market", "river", "library", "school", "garden", "station", "harbor"]
PETS = ["dog", "cat", "bird", "rabbit", "horse"]
WEATHER = ["sunny", "rainy", "cold", "windy", "warm", "cloudy"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def is_heldout(key: str, seed: int) -> bool:
    """True when ``key`` (a question text) is reserved for evaluation under ``seed``."""
    h = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") % HELDOUT_MOD == 0


def _accept(key: str, seed: int, split: str) -> bool:
    return is_heldout(key, seed) == (split == "heldout")


# ---- the invented world -------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """Invented countries and their facts; ``qa_facts`` are the (country, relation) pairs that
    also appear as Q/A in training (the rest appear only as statements)."""

    countries: tuple[str, ...]
    facts: dict  # country -> {relation: value}
    qa_facts: frozenset

    @staticmethod
    def from_seed(seed: int) -> "World":
        rng = random.Random(f"world:{seed}")
        names: list[str] = []
        while len(names) < 2 * N_COUNTRIES:  # countries + capitals, all distinct
            w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            if w not in names and len(w) <= 9:
                names.append(w)
        countries, capitals = names[:N_COUNTRIES], names[N_COUNTRIES:]
        facts = {c: {"capital": capitals[i], "language": c[:-1] + "ish" if c[-1] in "aeiou" else c + "ish",
                     "animal": rng.choice(ANIMALS), "currency": rng.choice(CURRENCIES)}
                 for i, c in enumerate(countries)}
        pairs = [(c, r) for c in countries for r in RELATIONS]
        stmt_only = set(rng.sample(pairs, int(len(pairs) * STATEMENT_ONLY_FRAC)))
        return World(tuple(countries), facts, frozenset(p for p in pairs if p not in stmt_only))


def fact_statement(world: World, country: str, rel: str) -> str:
    v = world.facts[country][rel]
    return {"capital": f"The capital of {country} is {v}.",
            "language": f"People in {country} speak {v}.",
            "animal": f"The national animal of {country} is the {v}.",
            "currency": f"The currency of {country} is the {v}."}[rel]


def fact_question(country: str, rel: str) -> str:
    return {"capital": f"What is the capital of {country}?",
            "language": f"What language do people in {country} speak?",
            "animal": f"What is the national animal of {country}?",
            "currency": f"What is the currency of {country}?"}[rel]


def fact_answer(world: World, country: str, rel: str) -> str:
    return world.facts[country][rel]


# ---- per-domain item generators (return (key, text) or structured items) -------------------------
def arith_problem(rng: random.Random) -> dict:
    """One word problem: 80% one step, 20% two steps; results stay in 0..198. ``expr`` is the
    bare expression (``23+45-12``) used by the drill documents."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a = rng.randint(1, 99)
    q, work, val, expr = [f"{name} has {a} {obj}."], [], a, str(a)
    for step in range(1 if rng.random() < 0.8 else 2):
        if val > 1 and rng.random() < 0.5:
            n = rng.randint(1, min(99, val))
            verb, new = rng.choice(SUB_VERBS), val - n
            work.append(f"{val}-{n}={new}.")
            expr += f"-{n}"
        else:
            n = rng.randint(1, 99)
            verb, new = rng.choice(ADD_VERBS), val + n
            work.append(f"{val}+{n}={new}.")
            expr += f"+{n}"
        q.append(("Then " if step else "") + f"{name} {verb.format(n=n)}.")
        val = new
    q.append(f"How many {obj} does {name} have now?")
    return {"question": " ".join(q), "answer": " ".join(work) + f"\n#### {val}", "value": val, "expr": expr}


def compare_problem(rng: random.Random, k: int | None = None) -> dict:
    k = k or rng.randint(3, 5)
    nums = rng.sample(range(1, 100), k)
    largest = rng.random() < 0.5
    word = "largest" if largest else "smallest"
    ans = max(nums) if largest else min(nums)
    q = f"Which number is the {word}: {', '.join(map(str, nums))}?"
    return {"question": q, "answer": str(ans), "options": [str(n) for n in nums], "label": nums.index(ans)}


def string_problem(rng: random.Random) -> dict:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
    op = rng.choice(["Copy", "Reverse", "Sort"])
    out = {"Copy": letters, "Reverse": letters[::-1], "Sort": sorted(letters)}[op]
    return {"question": f"{op} the letters: {' '.join(letters)}", "answer": " ".join(out)}


def sentence(rng: random.Random) -> str:
    n1, n2 = rng.sample(NAMES, 2)
    t = rng.randrange(5)
    place, pet, w = rng.choice(PLACES), rng.choice(PETS), rng.choice(WEATHER)
    return [f"{n1} walked to the {place} with a {pet}.",
            f"It was {w} when {n1} met {n2} at the {place}.",
            f"{n1} and {n2} like to read books in the {place}.",
            f"The {pet} of {n1} sleeps near the {place} when it is {w}.",
            f"On a {w} day, {n2} took the {pet} to the {place}."][t]


def _qa(q: str, a: str) -> str:
    return f"Question: {q}\nAnswer: {a}"


# ---- documents ---------------------------------------------------------------------------------
def _doc_arith(rng, world, seed, split):
    drill = rng.random() < DRILL_FRAC
    while True:
        p = arith_problem(rng)
        q = f"Compute {p['expr']}." if drill else p["question"]
        if _accept(q, seed, split):
            return _qa(q, p["answer"])


def _doc_compare(rng, world, seed, split):
    while True:
        p = compare_problem(rng)
        if _accept(p["question"], seed, split):
            return _qa(p["question"], p["answer"])


def _doc_strings(rng, world, seed, split):
    while True:
        p = string_problem(rng)
        if _accept(p["question"], seed, split):
            return _qa(p["question"], p["answer"])


def _doc_facts(rng, world, seed, split):
    c, rel = rng.choice(world.countries), rng.choice(RELATIONS)
    if (c, rel) in world.qa_facts and rng.random() < 0.5:
        return _qa(fact_question(c, rel), fact_answer(world, c, rel))
    rels = rng.sample(RELATIONS, rng.randint(1, 3))
    return " ".join(fact_statement(world, c, r) for r in rels)


def _doc_sentences(rng, world, seed, split):
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))


DOC_MAKERS: dict[str, Callable] = {"arithmetic": _doc_arith, "facts": _doc_facts,
                                   "compare": _doc_compare, "strings": _doc_strings,
                                   "sentences": _doc_sentences}


def iter_docs(seed: int, split: str = "train", mix: dict | None = None,
              stream: str = "main") -> Iterator[tuple[str, str]]:
    """Endless (domain, text) stream. ``stream`` names an independent RNG stream (e.g. the
    tokenizer sample vs the training data); ``mix`` maps domain -> weight (default DEFAULT_MIX)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; known: {list(DOMAINS)}")
    world = World.from_seed(seed)
    rng = random.Random(f"docs:{seed}:{split}:{stream}")
    doms, weights = list(mix), [mix[d] for d in mix]
    while True:
        d = rng.choices(doms, weights)[0]
        yield d, DOC_MAKERS[d](rng, world, seed, split)


def generate_docs(n: int, seed: int, split: str = "train", mix: dict | None = None,
                  stream: str = "main") -> list[str]:
    """The first ``n`` documents of ``iter_docs`` (texts only)."""
    it = iter_docs(seed, split, mix, stream)
    return [next(it)[1] for _ in range(n)]


# ---- evaluation items (held-out) -----------------------------------------------------------------
def arith_eval_items(n: int, seed: int) -> list[dict]:
    rng, out, seen = random.Random(f"eval-arith:{seed}"), [], set()
    while len(out) < n:
        p = arith_problem(rng)
        if is_heldout(p["question"], seed) and p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def compare_eval_items(n: int, seed: int) -> list[dict]:
    rng, out, seen = random.Random(f"eval-compare:{seed}"), [], set()
    while len(out) < n:
        p = compare_problem(rng, k=4)
        if is_heldout(p["question"], seed) and p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def fact_eval_items(seed: int) -> list[dict]:
    """One 4-way multiple-choice question per fact; distractors are other countries' values."""
    world = World.from_seed(seed)
    rng, out = random.Random(f"eval-facts:{seed}"), []
    for c in world.countries:
        for rel in RELATIONS:
            right = fact_answer(world, c, rel)
            pool = sorted({world.facts[o][rel] for o in world.countries} - {right})
            opts = rng.sample(pool, 3) + [right]
            rng.shuffle(opts)
            out.append({"question": fact_question(c, rel), "options": opts,
                        "label": opts.index(right), "seen_as_qa": (c, rel) in world.qa_facts})
    return out
