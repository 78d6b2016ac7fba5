"""The jobs the ETA accuracy benchmark drops (benchmarks/eta_accuracy.py): two sequences of
chat jobs of one model, each job a plan of how many requests, of what kind, asking for how
many tokens, and the request lines made from it.

`mixed` (the default: questions, instructions, passages to summarise and one-word labels;
max_tokens from 4 to 256; 20 to 2,000 requests) and `new-user` (five chat jobs of 300 to
1,200 requests with max_tokens 32, 24, 64, 16, 48, the third larger than any before it).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Plan:
    """One job of the sequence: how many requests, of what kind, asking for how much."""

    name: str
    requests: int
    kind: str  # "question", "instruction", "summary", "label" or "mixed"
    max_tokens: tuple[int, ...]  # drawn from for each request


# Sizes chosen so that the whole sequence takes about a quarter of an hour on two idle cores
# (much longer when other work shares them).
PLANS = (
    Plan("questions-20", 20, "question", (64,)),
    Plan("summaries-40", 40, "summary", (128,)),
    Plan("instructions-48", 48, "instruction", (192,)),
    Plan("mixed-100", 100, "mixed", (16, 64, 128)),
    Plan("labels-2000", 2000, "label", (4,)),
    Plan("questions-200", 200, "question", (48,)),
    Plan("summaries-60", 60, "summary", (96, 192)),
    Plan("instructions-100", 100, "instruction", (32, 128)),
    Plan("mixed-300", 300, "mixed", (16, 32)),
    Plan("questions-30", 30, "question", (256,)),
)
# A new user's first five chat jobs, from an empty history: one max_tokens each, the third
# larger than any before it.
NEW_USER = (
    Plan("new-32", 300, "mixed", (32,)),
    Plan("new-24", 600, "mixed", (24,)),
    Plan("new-64", 800, "mixed", (64,)),
    Plan("new-16", 1200, "mixed", (16,)),
    Plan("new-48", 500, "mixed", (48,)),
)
SEQUENCES = {"mixed": PLANS, "new-user": NEW_USER}

QUESTIONS = (
    "What is the capital of Australia?",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What is photosynthesis?",
    "Who painted the Mona Lisa?",
    "How far is the Moon from the Earth?",
    "What causes thunder?",
    "Why is the ocean salty?",
    "What is the difference between a virus and a bacterium?",
    "How do airplanes fly?",
    "What is the boiling point of water at the top of Mount Everest?",
    "Why do leaves change colour in autumn?",
    "What is inflation, in simple terms?",
    "How many bones are in the human body?",
    "What does DNA stand for?",
    "Why do we have leap years?",
    "What is the largest planet in the solar system?",
    "How does a compass work?",
    "What is the speed of light?",
    "Why do onions make people cry?",
    "What language is spoken in Brazil?",
    "How do bees make honey?",
    "What is a black hole?",
    "Who invented the telephone?",
    "What is the tallest mountain in Africa?",
    "Why is the sky dark at night?",
    "How does a microwave oven heat food?",
    "What are the three states of matter?",
    "What is the main ingredient of guacamole?",
    "How long does light from the Sun take to reach Earth?",
)
INSTRUCTIONS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how to change a flat tyre, step by step.",
    "Write a haiku about the sea.",
    "List ten ideas for a rainy afternoon with children.",
    "Describe the water cycle for a school textbook.",
    "Write a cover letter for a job as a librarian.",
    "Give me a recipe for a simple vegetable soup.",
    "Explain the rules of chess to a beginner.",
    "Write a limerick about a forgetful wizard.",
    "Draft a friendly reminder email about an overdue invoice.",
    "Compare trains and planes for travelling across Europe.",
    "Write a product description for a reusable water bottle.",
    "Suggest a weekly exercise plan for someone starting to run.",
    "Explain what a database index is and why it helps.",
    "Write a dialogue between a customer and a baker.",
)
OPINIONS = (
    "I loved",
    "I was disappointed by",
    "Nothing special about",
    "Absolutely brilliant:",
    "Would not recommend",
    "Pleasantly surprised by",
    "Waste of money:",
    "Five stars for",
)
SUBJECTS = (
    "the battery life of this phone.",
    "the service at this restaurant, the waiter forgot our order twice.",
    "this novel; the ending made me cry.",
    "the hotel room, which was clean and quiet.",
    "these headphones after only a week of use.",
    "the delivery, which arrived two days early.",
)
SENTENCES = (
    "The harbour town was founded by fishermen who followed the herring along the coast.",
    "For two centuries its fortunes rose and fell with the size of the catch.",
    "In the eighteenth century a merchant family built warehouses along the quay.",
    "Their ships carried salted fish south and came back with wine, cloth and spices.",
    "A stone lighthouse was raised on the northern headland after a winter of wrecks.",
    "When the railway arrived, fresh fish could reach the capital in a single night.",
    "The population doubled within a generation, and new streets climbed the hill.",
    "A school, a hospital and a covered market followed, paid for by a tax on landings.",
    "Then the herring vanished, and no one could agree on why.",
    "Some blamed overfishing, others the warming water or the new steam trawlers.",
    "The warehouses emptied, the young left for the cities, and the market closed.",
    "For thirty years the town seemed to be sinking into the sea it had lived from.",
    "Its revival began with a festival started by a retired teacher and a few friends.",
    "Visitors came for the music and stayed for the cliffs, the light and the food.",
    "Artists rented the old warehouses as studios and opened galleries on the quay.",
    "Today the harbour holds more sailing boats than fishing boats.",
    "The lighthouse is a museum, and the covered market has reopened on Saturdays.",
    "Residents still argue about whether the town has been saved or merely changed.",
    "Housing has become expensive, and many cottages stand empty in winter.",
    "Yet the festival still ends, every summer, with a procession of boats at dusk.",
)


def request_text(kind: str, chooser: random.Random) -> str:
    if kind == "mixed":
        kind = chooser.choice(("question", "instruction", "summary"))
    if kind == "question":
        return chooser.choice(QUESTIONS)
    if kind == "instruction":
        return chooser.choice(INSTRUCTIONS)
    if kind == "label":
        review = f"{chooser.choice(OPINIONS)} {chooser.choice(SUBJECTS)}"
        return f"Is this review positive or negative? Answer with one word.\n\n{review}"
    count = chooser.randint(4, len(SENTENCES))
    start = chooser.randrange(len(SENTENCES))
    passage = " ".join(SENTENCES[(start + index) % len(SENTENCES)] for index in range(count))
    return f"Summarise the following passage in a few sentences.\n\n{passage}"


def job_lines(plan: Plan, seed: int) -> bytes:
    chooser = random.Random(seed)
    lines = []
    for index in range(plan.requests):
        body = {
            "messages": [{"role": "user", "content": request_text(plan.kind, chooser)}],
            "max_tokens": chooser.choice(plan.max_tokens),
            "temperature": chooser.choice((0.7, 0.8, 1.0)),
        }
        lines.append(
            {"custom_id": f"{plan.name}-{index}", "method": "POST", "url": "/v1/chat/completions"}
            | {"body": body}
        )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def planned(sequence: str, jobs: int, scale: float) -> list[Plan]:
    """The first `jobs` plans of a sequence, each with `scale` times its requests."""
    return [
        replace(plan, requests=max(1, round(plan.requests * scale)))
        for plan in SEQUENCES[sequence][:jobs]
    ]


def max_tokens_asked(data: bytes) -> list[list[int]]:
    """[max_tokens, requests] for the lines of a job, as the service counts them."""
    counts = Counter(json.loads(line)["body"]["max_tokens"] for line in data.splitlines())
    return [[value, count] for value, count in sorted(counts.items())]
