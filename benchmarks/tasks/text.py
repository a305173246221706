"""`text`: short stories from a small templated grammar, so served models write readable English.

    Once upon a time there was a little fox named Mia. One day Mia went to the river. She found
    a red kite under a tree. ...

A story is an opening sentence, 3-5 middle sentences and a closing sentence, each from a fixed
template with slots filled from small word lists (one hero and one friend per story). The prompt
is the opening sentence; the completion is the rest. There is no single right continuation, so
the task's score is grammaticality: `extract_answer` returns the first generated sentence and
`is_grammatical` says whether some template produces it.
"""

from __future__ import annotations

import random
import re

from benchmarks.tasks.example import Example

TASK = "text"

HEROES = {  # name -> subject pronoun
    "Tom": "he", "Ben": "he", "Sam": "he", "Max": "he", "Leo": "he",
    "Anna": "she", "Mia": "she", "Lily": "she", "Emma": "she", "Zoe": "she",
}
WORDS = {
    "size": ["little", "big", "small", "tiny", "young"],
    "animal": ["cat", "dog", "bird", "fox", "frog", "duck", "rabbit", "horse", "bear", "mouse"],
    "object": ["ball", "book", "kite", "box", "hat", "cup", "toy", "drum", "boat", "bell"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "feeling": ["happy", "sad", "tired", "hungry", "glad", "sleepy", "kind", "brave"],
    "place": ["park", "garden", "house", "school", "forest", "river", "shop", "farm", "beach", "hill"],
    "food": ["apples", "cake", "bread", "soup", "milk", "pie", "carrots", "honey"],
}

OPENINGS = [
    "Once upon a time there was a {size} {animal} named {hero}.",
    "{hero} was a {size} {animal} who lived near the {place}.",
    "There once was a {size} {animal} called {hero}.",
]
MIDDLES = [
    "One day {hero} went to the {place}.",
    "{Pron} found a {color} {object} under a tree.",
    "{hero} gave the {object} to {friend}.",
    "{friend} was very {feeling}.",
    "They played with the {object} all day.",
    "{Pron} ate some {food} at the {place}.",
    "Then {hero} and {friend} walked to the {place}.",
    "{Pron} saw a {color} {animal} by the {place}.",
    "{friend} said that the {object} was {color}.",
    "The sun was warm and the sky was {color}.",
    "{hero} wanted to find a {color} {object}.",
    "{friend} had a {size} {object} and some {food}.",
]
CLOSINGS = [
    "At the end of the day {hero} was {feeling}.",
    "{hero} went home and went to sleep.",
    "{hero} and {friend} were good friends.",
    "The end.",
]


def generate(rng: random.Random) -> Example:
    hero, friend = rng.sample(sorted(HEROES), 2)
    # One object/animal/place per story most of the time, so the stories hang together.
    theme = {slot: rng.choice(words) for slot, words in WORDS.items()}

    def fill(template: str) -> str:
        slots = {slot: (theme[slot] if rng.random() < 0.6 else rng.choice(words)) for slot, words in WORDS.items()}
        return template.format(hero=hero, friend=friend, Pron=HEROES[hero].capitalize(), **slots)

    middle = [fill(t) for t in rng.sample(MIDDLES, rng.randint(3, 5))]
    sentences = [fill(rng.choice(OPENINGS)), *middle, fill(rng.choice(CLOSINGS))]
    return Example(task=TASK, prompt=sentences[0], answer="", completion=" " + " ".join(sentences[1:]))


def _template_pattern(template: str) -> str:
    names = "|".join(HEROES)
    slots = {slot: "(?:" + "|".join(words) + ")" for slot, words in WORDS.items()}
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return escaped.format(hero=f"(?:{names})", friend=f"(?:{names})", Pron="(?:He|She|They)", **slots)


_GRAMMAR = re.compile("|".join(f"(?:{_template_pattern(t)})" for t in OPENINGS + MIDDLES + CLOSINGS))


def is_grammatical(sentence: str) -> bool:
    """Whether some template of the grammar produces `sentence` (names may be any hero)."""
    return _GRAMMAR.fullmatch(sentence.strip()) is not None


_SENTENCE = re.compile(r"[^.]*\.")


def extract_answer(text: str) -> str | None:
    """The first complete sentence of `text` (stripped), or None if no sentence ends."""
    match = _SENTENCE.match(text)
    return match.group(0).strip() if match else None


def is_correct(example: Example, generated: str) -> bool:
    """The first generated sentence is one the grammar produces."""
    sentence = extract_answer(generated)
    return sentence is not None and is_grammatical(sentence)
