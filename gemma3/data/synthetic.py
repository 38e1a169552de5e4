"""A seeded generator of short children's stories, the default offline data source.

Written for this project (no external text). Each story has a hero with a name and consistent
pronouns, a friend, a place, a wanted object, a small problem and its resolution, a line or two of
dialogue and an ending, each part drawn from several templates and word lists. The structure is
regular enough for a small model to learn in minutes on a CPU and varied enough that stories do
not repeat. Story i depends only on (seed, i), so splits can be generated independently.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

from gemma3.data.raw import write_source_info, write_split
from gemma3.errors import Gemma3Error

GIRLS = [
    "Lily",
    "Mia",
    "Sue",
    "Anna",
    "Emma",
    "Lucy",
    "Sara",
    "Zoe",
    "Ella",
    "Amy",
    "Kim",
    "Rosa",
    "Nina",
    "Maya",
    "Ruby",
    "Daisy",
    "Grace",
    "Chloe",
    "Ivy",
    "Jane",
    "Molly",
    "Hannah",
    "Sophie",
    "Lola",
    "Bella",
    "Nora",
    "Pia",
    "Tess",
    "Eva",
    "June",
]
BOYS = [
    "Tom",
    "Ben",
    "Max",
    "Sam",
    "Leo",
    "Jack",
    "Tim",
    "Joe",
    "Finn",
    "Jake",
    "Noah",
    "Luke",
    "Eli",
    "Owen",
    "Adam",
    "Theo",
    "Ned",
    "Bob",
    "Dan",
    "Milo",
    "Oscar",
    "Hugo",
    "Ray",
    "Paul",
    "Otto",
    "Carl",
    "Ian",
    "Ravi",
    "Omar",
    "Lucas",
]
KINDS_GIRL = [
    "little girl",
    "girl",
    "kind girl",
    "happy girl",
    "curious girl",
    "brave girl",
    "shy girl",
]
KINDS_BOY = ["little boy", "boy", "kind boy", "happy boy", "curious boy", "brave boy", "shy boy"]
ANIMALS = [
    ("cat", "it"),
    ("dog", "it"),
    ("bunny", "it"),
    ("bird", "it"),
    ("frog", "it"),
    ("duck", "it"),
    ("puppy", "it"),
    ("kitten", "it"),
    ("bear", "it"),
    ("fox", "it"),
    ("mouse", "it"),
    ("turtle", "it"),
    ("owl", "it"),
    ("squirrel", "it"),
    ("pony", "it"),
]
ADJ = [
    "big",
    "small",
    "red",
    "blue",
    "shiny",
    "soft",
    "old",
    "new",
    "funny",
    "pretty",
    "yellow",
    "green",
    "tiny",
    "round",
    "fluffy",
    "bright",
    "purple",
    "striped",
    "little",
    "warm",
]
OBJECTS = [
    "ball",
    "kite",
    "toy car",
    "doll",
    "hat",
    "book",
    "balloon",
    "teddy bear",
    "drum",
    "shell",
    "box",
    "cup",
    "boat",
    "flower",
    "crayon",
    "scarf",
    "blanket",
    "train",
    "apple",
    "cookie",
    "puzzle",
    "rock",
    "bell",
    "key",
    "ribbon",
    "umbrella",
    "sock",
    "spoon",
    "leaf",
    "star",
]
PLACES = [
    "the park",
    "the garden",
    "the forest",
    "the beach",
    "the farm",
    "the lake",
    "the yard",
    "the hill",
    "the zoo",
    "the school",
    "the market",
    "the library",
    "the river",
    "the meadow",
    "the playground",
    "the kitchen",
    "the big field",
    "the little town",
    "the woods",
    "the pond",
]
HIDES = [
    "under a big tree",
    "behind a rock",
    "in the tall grass",
    "under the bed",
    "in a hole",
    "on a high branch",
    "in the mud",
    "behind the fence",
    "in a bush",
    "under the bench",
    "on the roof",
    "in the water",
    "under a pile of leaves",
    "inside an old box",
]
FEEL_BAD = ["sad", "scared", "worried", "upset", "angry", "lonely", "grumpy", "nervous"]
FEEL_GOOD = ["happy", "glad", "proud", "excited", "calm", "thankful", "cheerful", "joyful"]
WEATHER = ["sunny", "rainy", "windy", "snowy", "warm", "cold", "cloudy", "bright"]
ACTIVITIES = ["play", "run", "jump", "dance", "sing", "draw", "swim", "climb", "explore", "read"]
HELPERS = [
    ("mom", "she"),
    ("dad", "he"),
    ("grandma", "she"),
    ("grandpa", "he"),
    ("teacher", "she"),
    ("big sister", "she"),
    ("big brother", "he"),
    ("neighbor", "he"),
]
MORALS = [
    "sharing makes everyone happy",
    "it is good to ask for help",
    "being kind is the best thing to do",
    "friends help each other",
    "it is okay to make mistakes",
    "being brave can be small and quiet",
    "saying sorry makes things better",
    "patience helps you find what you need",
    "working together makes hard things easy",
    "telling the truth is important",
]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def generate_story(rng: random.Random) -> str:
    """One story; all randomness comes from `rng`."""
    hero_is_girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if hero_is_girl else BOYS)
    kind = rng.choice(KINDS_GIRL if hero_is_girl else KINDS_BOY)
    he, him, his = ("she", "her", "her") if hero_is_girl else ("he", "him", "his")
    friend_is_girl = rng.random() < 0.5
    friend = rng.choice([n for n in (GIRLS if friend_is_girl else BOYS) if n != hero])
    fhe = "she" if friend_is_girl else "he"
    animal, _ = rng.choice(ANIMALS)
    adj = rng.choice(ADJ)
    obj = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    hide = rng.choice(HIDES)
    bad, good = rng.choice(FEEL_BAD), rng.choice(FEEL_GOOD)
    helper, hhe = rng.choice(HELPERS)
    activity = rng.choice(ACTIVITIES)
    weather = rng.choice(WEATHER)
    moral = rng.choice(MORALS)

    opening = rng.choice(
        [
            f"Once upon a time, there was {_a(kind)} named {hero}.",
            f"Once upon a time, in a small house near {place}, lived {_a(kind)} named {hero}.",
            f"One {weather} day, {_a(kind)} named {hero} went to {place}.",
            f"There once was {_a(kind)} called {hero} who loved to {activity}.",
            f"{hero} was {_a(kind)} who lived with {his} {helper}.",
        ]
    )
    setup = rng.choice(
        [
            f"{_cap(he)} had {_a(adj + ' ' + obj)} that {he} loved very much.",
            f"{_cap(his)} favorite thing was {_a(adj + ' ' + obj)}.",
            f"Every day, {he} played with {his} {adj} {obj} at {place}.",
            f"{_cap(his)} {helper} gave {him} {_a(adj + ' ' + obj)} for {his} birthday.",
        ]
    )
    meet = rng.choice(
        [
            f"One day, {hero} went to {place} with {his} friend {friend}.",
            f"At {place}, {hero} met a {animal} and {his} friend {friend}.",
            f"It was {_a(weather)} day, and {hero} and {friend} wanted to {activity}.",
            f"{hero} and {friend} ran to {place} to {activity} together.",
        ]
    )
    found = [
        f"{friend} looked {hide} and found the {obj}. {fhe.capitalize()} gave it back to {hero}.",
        f"{_cap(his)} {helper} came to help. {_cap(hhe)} found the {obj} {hide}.",
    ]
    # Each problem comes with the resolutions that make sense for it.
    problem, fixes = rng.choice(
        [
            (
                f"But then, the {obj} was gone! {hero} looked everywhere, but {he} could not find it.",
                found,
            ),
            (
                f"Suddenly, a {animal} took the {obj} and ran away. {hero} felt {bad}.",
                [f"The {animal} came back and dropped the {obj} at {hero}'s feet.", *found],
            ),
            (f"Then the wind blew the {obj} far away, and it landed {hide}.", found),
            (
                f"Oh no! The {obj} broke into two pieces. {hero} was very {bad}.",
                [
                    f"{_cap(his)} {helper} fixed the {obj} with some glue and a big smile.",
                    f"{friend} helped {him} put the pieces back together.",
                ],
            ),
            (
                f"{friend} wanted the {obj} too, and the two friends started to fight.",
                [
                    f"{hero} and {friend} decided to share the {obj} and take turns.",
                    f"{hero} said sorry to {friend}, and {friend} said sorry too.",
                ],
            ),
        ]
    )
    talk = rng.choice(
        [
            f'"I miss my {obj}," {hero} said with a small voice.',
            f'"What can I do?" {hero} asked. "Let\'s think," said {friend}.',
            f'{hero} cried, "This is not fair!"',
            f'"Don\'t be {bad}," said {friend}. "I will help you."',
            f'{hero} said, "Can you help me, please?"',
        ]
    )
    resolve = rng.choice(fixes)
    reply = rng.choice(
        [
            f'"Thank you!" said {hero}. "You are a good friend."',
            f'"You are welcome," said {friend}, and they both laughed.',
            f'{hero} hugged {friend} and said, "Let\'s {activity} together!"',
            '"We did it!" they shouted.',
            "",
        ]
    )
    ending = rng.choice(
        [
            f"From that day on, {hero} knew that {moral}.",
            f"{hero} felt {good}. {_cap(he)} learned that {moral}.",
            f"They played at {place} until the sun went down, and {hero} was {good}.",
            f"That night, {hero} went to bed with {his} {obj} and a big smile.",
            f"{hero} and {friend} were best friends forever.",
        ]
    )
    body = " ".join(s for s in (problem, talk, resolve, reply) if s)
    return f"{opening} {setup} {meet}\n\n{body}\n\n{ending}"


def synthetic_stories(n: int, seed: int, offset: int = 0) -> Iterator[str]:
    """Stories offset..offset+n-1; story i depends only on (seed, i)."""
    for i in range(offset, offset + n):
        yield generate_story(random.Random(f"gemma3-synthetic:{seed}:{i}"))


def write_synthetic(
    raw_dir: str | os.PathLike[str], n_train: int, n_val: int, seed: int
) -> dict[str, Any]:
    """Write train (stories 0..n_train-1) and validation (a disjoint index range) splits."""
    for name, n in (("data.synthetic.n_train", n_train), ("data.synthetic.n_val", n_val)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise Gemma3Error(f"params.yaml: {name}: must be an integer >= 1, got {n!r}")
    from tqdm import tqdm

    # Validation comes from a far index range so it never overlaps train, whatever n_train is.
    val_offset = 1 << 40
    info: dict[str, Any] = {"source": "synthetic", "seed": seed}
    for split, n, offset in (("train", n_train, 0), ("validation", n_val, val_offset)):
        stories = tqdm(
            synthetic_stories(n, seed, offset),
            total=n,
            desc=f"synthetic {split}",
            unit="story",
            disable=None if n > 5000 else True,
        )
        info[split] = write_split(raw_dir, split, stories)
    write_source_info(raw_dir, info)
    return info
