"""The prompt set for the SmolLM2 showcase adapters: short, diverse instructions and questions.

Made programmatically from question templates x subjects (no data set can be downloaded here), so
the set is deterministic and needs only the standard library. The train / held-out split is by
*subject*: every question about a held-out subject (e.g. "volcanoes", "Kenya", "otter") is held
out, so the evaluation measures a behaviour on subjects the adapter never saw in training.

    from prompts import train_prompts, heldout_prompts   # (models/smollm2 on sys.path)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 1234
HELDOUT_FRACTION = 0.22

# (category, templates, subjects). Each template has one "{}" for the subject.
CONCEPTS = [
    "photosynthesis", "gravity", "electricity", "magnetism", "volcanoes", "earthquakes", "rainbows", "tides",
    "the moon", "the sun", "black holes", "DNA", "vaccines", "the internet", "democracy", "inflation",
    "recycling", "climate change", "the water cycle", "friction", "sound", "light", "clouds", "glaciers",
    "the immune system", "sleep", "exercise", "music", "poetry", "chess", "mathematics", "algebra",
    "a computer", "a battery", "a bicycle", "an airplane", "a telescope", "a microscope", "a compass",
    "the printing press", "money", "a library", "a museum", "coffee", "chocolate", "bread", "cheese",
    "a rainforest", "a desert", "the ocean", "a river", "a mountain", "the Olympic Games", "a solar panel",
]
CONCEPT_TEMPLATES = [
    "What is {}?",
    "Explain {} in one sentence.",
    "Why is {} important?",
    "Give me one interesting fact about {}.",
    "How would you describe {} to a child?",
    "Tell me something about {}.",
]
COUNTRIES = [
    "France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico", "Egypt",
    "Kenya", "Australia", "Russia", "Norway", "Sweden", "Greece", "Turkey", "Argentina", "Peru", "Portugal",
    "Poland", "Ireland", "Thailand", "Vietnam", "Nigeria", "Chile", "Austria", "Switzerland", "Netherlands",
]
COUNTRY_TEMPLATES = [
    "What is the capital of {}?",
    "What language is spoken in {}?",
    "Name a famous food from {}.",
    "Where is {} located?",
]
ANIMALS = [
    "a cat", "a dog", "a horse", "an elephant", "a lion", "a tiger", "a penguin", "a dolphin", "a whale",
    "an eagle", "an owl", "a bee", "an ant", "a frog", "a snake", "a turtle", "a rabbit", "a fox", "a wolf",
    "a bear", "a giraffe", "a zebra", "a kangaroo", "a koala", "a shark", "an octopus", "a parrot", "a camel",
    "an otter", "a butterfly",
]
ANIMAL_TEMPLATES = [
    "What does {} eat?",
    "Where does {} live?",
    "Describe {} in one sentence.",
    "What is special about {}?",
]
ACTIVITIES = [
    "cooking", "running", "studying", "writing", "painting", "gardening", "saving money", "learning a language",
    "public speaking", "swimming", "programming", "reading more books", "sleeping well", "staying focused",
    "making friends", "playing guitar", "taking photos", "travelling cheaply", "drinking more water", "yoga",
]
ACTIVITY_TEMPLATES = [
    "Give me a tip for {}.",
    "How can I get better at {}?",
    "What is a common mistake when {}?",
]
WORDS = [
    "happy", "brave", "curious", "ancient", "gentle", "enormous", "fragile", "generous", "honest", "quiet",
    "rapid", "bright", "clever", "humble", "patient", "vivid", "calm", "loyal", "strange", "wise",
]
WORD_TEMPLATES = [
    "What does the word '{}' mean?",
    "Use the word '{}' in a sentence.",
    "What is the opposite of '{}'?",
]
CREATIVE_SUBJECTS = [
    "a lost key", "a friendly robot", "a rainy day", "a tiny dragon", "the first day of school", "a haunted house",
    "a talking tree", "a trip to the moon", "a magic hat", "an old lighthouse", "a brave mouse", "a secret garden",
]
CREATIVE_TEMPLATES = [
    "Write a one-sentence story about {}.",
    "Suggest a title for a book about {}.",
    "Write a short poem line about {}.",
]


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    subject: str


def _math_prompts(rng: random.Random) -> list[Prompt]:
    out = []
    for _ in range(40):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        op = rng.choice(["plus", "times", "minus"])
        out.append(Prompt(f"What is {a} {op} {b}?", "math", f"{a} {op} {b}"))
    return out


def _all_prompts() -> list[Prompt]:
    groups = [
        ("concept", CONCEPT_TEMPLATES, CONCEPTS),
        ("country", COUNTRY_TEMPLATES, COUNTRIES),
        ("animal", ANIMAL_TEMPLATES, ANIMALS),
        ("activity", ACTIVITY_TEMPLATES, ACTIVITIES),
        ("word", WORD_TEMPLATES, WORDS),
        ("creative", CREATIVE_TEMPLATES, CREATIVE_SUBJECTS),
    ]
    rng = random.Random(SEED)
    prompts: list[Prompt] = []
    for category, templates, subjects in groups:
        for subject in subjects:
            # Two templates per subject (not all of them): more subjects for the same budget.
            for template in rng.sample(templates, 2):
                prompts.append(Prompt(template.format(subject), category, subject))
    prompts.extend(_math_prompts(rng))
    return prompts


def split() -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out), disjoint by subject, each in a fixed shuffled order."""
    prompts = _all_prompts()
    rng = random.Random(SEED + 1)
    subjects = sorted({(p.category, p.subject) for p in prompts})
    heldout_subjects = set(rng.sample(subjects, round(HELDOUT_FRACTION * len(subjects))))
    train = [p for p in prompts if (p.category, p.subject) not in heldout_subjects]
    heldout = [p for p in prompts if (p.category, p.subject) in heldout_subjects]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def train_prompts() -> list[str]:
    return [p.text for p in split()[0]]


def heldout_prompts() -> list[str]:
    return [p.text for p in split()[1]]


if __name__ == "__main__":
    tr, ho = split()
    print(f"{len(tr)} train, {len(ho)} held-out prompts")
    for p in ho[:10]:
        print(" ", p.category, "|", p.text)
