"""Write examples/label_job.jsonl: the nightly labelling job in miniature.

A ~600-token shared instruction (guidelines + few-shot examples) as the system message,
then one short review per record. Deterministic: rerunning gives the same file.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

GUIDELINES = """You are a careful annotator for an online shop. Read one customer review and \
answer with exactly one label: positive, negative or mixed.

Rules:
1. positive: the customer is satisfied overall; small complaints that they call minor \
do not change this.
2. negative: the customer is dissatisfied overall, wants a refund, or warns others away.
3. mixed: clear praise and clear criticism of comparable weight, or the customer says \
it is fine but not great.
4. Judge the product and the service together: late delivery that annoyed the customer \
counts against an otherwise good product.
5. Ignore sarcasm markers you cannot resolve; label what the words literally say.
6. Do not explain your answer. Output the label only, in lower case, with no punctuation.
7. If the review is not about a product or service at all, answer mixed.
8. Star ratings mentioned in the text win over the tone of the text.

Examples:
Review: The blender crushes ice in seconds and it is quieter than my old one. Love it.
Label: positive
Review: Stopped working after two weeks and support never answered my emails.
Label: negative
Review: Great sound for the price, but the ear cushions started peeling after a month.
Label: mixed
Review: Arrived a week late and the box was crushed, but the lamp itself works perfectly.
Label: mixed
Review: Five stars. Exactly as described, fast shipping, would buy again.
Label: positive
Review: Cheap plastic, the zipper broke on the first day. Returning it.
Label: negative
Review: It does the job. Nothing special, nothing wrong.
Label: mixed
Review: My kids use this tablet every day and the battery still lasts all afternoon.
Label: positive
Review: The instructions were in the wrong language and two screws were missing.
Label: negative
Review: Comfortable shoes, though they run half a size small; order up.
Label: mixed
Review: One star. The smell of the mattress did not go away after three weeks of airing.
Label: negative
Review: Beautiful colour and the fabric feels expensive. Gets compliments every time.
Label: positive
Review: The app keeps logging me out and the scale gives a different weight each time.
Label: negative
Review: Good value. The handle gets hot, which the listing did not mention, but I still use it daily.
Label: mixed
Review: Replaced my ten-year-old drill with this one and it is lighter, stronger and the battery charges in half an hour.
Label: positive
Review: Customer service sent a replacement within two days when the first one arrived cracked. Impressed.
Label: positive
Review: Pretty, but it wobbles on every table and the paint chips if you look at it.
Label: negative"""

PRODUCTS = ["kettle", "backpack", "desk chair", "phone case", "coffee grinder", "rain jacket",
            "keyboard", "yoga mat", "frying pan", "bike light", "monitor", "water bottle",
            "vacuum cleaner", "headphones", "office lamp"]  # fmt: skip
PRAISE = ["works better than I expected", "feels solid and well made", "was easy to set up",
          "looks great on my desk", "is worth every penny", "arrived the next day"]  # fmt: skip
COMPLAINTS = ["broke within a week", "is much smaller than the photos", "smells of chemicals",
              "stopped charging after a few days", "was missing parts", "is far too loud"]  # fmt: skip


def review(rng: random.Random, product: str) -> str:
    kind = rng.choice(["positive", "negative", "mixed"])
    if kind == "positive":
        return f"The {product} {rng.choice(PRAISE)}. Very happy with it."
    if kind == "negative":
        return f"The {product} {rng.choice(COMPLAINTS)}. I want my money back."
    return f"The {product} {rng.choice(PRAISE)}, but it {rng.choice(COMPLAINTS)}."


def main() -> None:
    rng = random.Random(2026)
    lines = []
    for i, product in zip(range(120), itertools.cycle(PRODUCTS)):
        messages = [
            {"role": "system", "content": GUIDELINES},
            {"role": "user", "content": f"Review: {review(rng, product)}\nLabel:"},
        ]
        lines.append(json.dumps({"id": f"rev-{i:04d}", "messages": messages, "max_tokens": 8}))
    out = Path(__file__).with_name("label_job.jsonl")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
