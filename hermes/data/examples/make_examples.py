"""Generate the bundled example data: `sft.jsonl` (conversations) and `preference.jsonl` (DPO pairs).

    python -m hermes.data.examples.make_examples [--out DIRECTORY] [--seed N]

The output is a pure function of the seed (standard library only), so the shipped files can be checked
byte for byte against a fresh run. The tasks are small enough for a tiny model (2 layers, dim 256) to learn
visibly in minutes on CPU, and cover the Hermes formats:

- math: small-integer arithmetic, single and multi-turn, some with `<SCRATCHPAD>` reasoning first;
- general_instructions: string transforms (reverse, uppercase, count a letter), single and multi-turn;
- steering_alignment: the system prompt decides the answer's form (number only, a sentence, uppercase);
- tool_use: choosing among get_weather(city), get_time(city) and convert_currency(amount, from, to), with
  `<tool_call>` / `<tool_response>` turns and a final answer (one call or two calls in one turn), questions
  that need no tool, and RAG answers citing documents with `<co: doc_id> ... </co>`.

Records alternate between the ShareGPT and OpenAI forms. A few records are deliberately bad content
(REFUSALS refusals and EMPTY_TURNS empty assistant turns) so that a default run shows the filters dropping
and counting them.

Preference pairs: chosen is the correct answer, rejected a wrong one (wrong sum, wrong transform, wrong
count, wrong tool, wrong argument).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 0
CONVERSATIONS = 2000
PAIRS = 400
REFUSALS = 12
EMPTY_TURNS = 6

WORDS = (
    "apple",
    "banana",
    "cherry",
    "dragon",
    "engine",
    "forest",
    "garden",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lemon",
    "mango",
    "needle",
    "orange",
    "pepper",
    "quartz",
    "river",
    "salmon",
    "tiger",
    "umbrella",
    "violin",
    "window",
    "yellow",
    "zebra",
    "anchor",
    "bridge",
    "candle",
    "desert",
    "eagle",
    "falcon",
    "guitar",
    "hammer",
    "igloo",
    "jacket",
    "koala",
    "ladder",
    "marble",
    "nectar",
    "otter",
    "pillow",
    "rocket",
    "silver",
    "tomato",
    "velvet",
    "walnut",
    "basket",
    "cactus",
    "donkey",
)
NAMES = (
    "Ada",
    "Ben",
    "Cora",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tara",
)
CITIES = (
    "Paris",
    "London",
    "Tokyo",
    "Lima",
    "Cairo",
    "Oslo",
    "Rome",
    "Delhi",
    "Sydney",
    "Toronto",
    "Madrid",
    "Seoul",
    "Nairobi",
    "Dublin",
)
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
COLORS = ("red", "blue", "green", "purple", "orange", "black", "white", "yellow")
PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster")
USD_RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 150.0, "CHF": 0.88, "CAD": 1.36}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "description": "Amount to convert"},
                    "from": {"type": "string", "description": "ISO code of the source currency"},
                    "to": {"type": "string", "description": "ISO code of the target currency"},
                },
                "required": ["amount", "from", "to"],
            },
        },
    },
]
TOOL_SYSTEM = "You are a helpful assistant. Call a function when it helps answer the question."
SCRATCHPAD_SYSTEM = "Think step by step inside <SCRATCHPAD> tags, then answer."
RAG_SYSTEM = "Answer from the documents and cite them as <co: doc_id> ... </co>."
STEERING_SYSTEMS = {
    "number": "Answer with the result only.",
    "sentence": "Answer in one full sentence.",
    "upper": "Reply in uppercase letters only.",
}

Turn = tuple[str, str]  # (role, content)
Built = tuple[str, list[Turn], bool]  # (category, turns, uses tools)


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} * {b}", a * b
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-" and b > a:
        a, b = b, a
    return f"{a} {op} {b}", a + b if op == "+" else a - b


def _column_steps(expression: str) -> str:
    """Working of `a op b` for the scratchpad: column by column for + and -, counting by a for *."""
    left, op, right = expression.split()
    a, b = int(left), int(right)
    if op == "*":
        return f"{a} * {b}: " + ", ".join(str(a * k) for k in range(1, b + 1)) + "."
    steps, carry = [], 0
    for place, name in ((1, "Units"), (10, "Tens")):
        da, db = a // place % 10, b // place % 10
        extra = f" {op} 1" if carry else ""
        if op == "+":
            total = da + db + carry
            carry = total // 10
            steps.append(f"{name}: {da} + {db}{extra} = {total}" + (", carry 1" if carry else ""))
        else:
            total = da - db - carry
            carry = int(total < 0)
            steps.append(
                f"{name}: {da + 10 * carry} - {db}{extra} = {total + 10 * carry}"
                + (", borrow 1" if carry else "")
            )
    if carry:
        steps.append("Hundreds: 1")
    return ". ".join(steps) + "."


def _math(rng: random.Random) -> Built:
    expression, result = _arithmetic(rng)
    question = rng.choice(("What is {}?", "Compute {}.", "Calculate {}.", "{} = ?")).format(expression)
    kind = rng.random()
    if kind < 0.3:
        answer = f"<SCRATCHPAD>\n{_column_steps(expression)}\n</SCRATCHPAD>\n{expression} = {result}"
        return "math", [("system", SCRATCHPAD_SYSTEM), ("user", question), ("assistant", answer)], False
    turns = [("user", question), ("assistant", f"{expression} = {result}.")]
    if kind < 0.6:
        factor = rng.randint(2, 5)
        added = rng.randint(1, 20)
        follow = rng.choice(
            (
                (f"Now multiply that by {factor}.", f"{result} * {factor} = {result * factor}."),
                (f"And add {added} to it?", f"{result} + {added} = {result + added}."),
            )
        )
        turns += [("user", follow[0]), ("assistant", follow[1])]
    return "math", turns, False


def _transform(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, word, answer) for one string transform."""
    word = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return f"Reverse the word '{word}'.", word, word[::-1]
    if kind == 1:
        return f"Write '{word}' in uppercase.", word, word.upper()
    letter = rng.choice([*sorted(set(word)), "a", "e", "o"])
    count = word.count(letter)
    return f"How many times does the letter '{letter}' appear in '{word}'?", word, str(count)


def _general(rng: random.Random) -> Built:
    instruction, word, answer = _transform(rng)
    if instruction.startswith("How many") and rng.random() < 0.3:
        letter = instruction.split("'")[1]
        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        spelled = "-".join(word)
        found = f"at positions {', '.join(positions)}" if positions else "nowhere"
        reply = f"<SCRATCHPAD>\n{spelled}: '{letter}' is {found}.\n</SCRATCHPAD>\n{answer}"
        return (
            "general_instructions",
            [("system", SCRATCHPAD_SYSTEM), ("user", instruction), ("assistant", reply)],
            False,
        )
    turns = [("user", instruction), ("assistant", answer)]
    if not instruction.startswith("How many") and rng.random() < 0.35:
        turns += rng.choice(
            (
                [("user", "Now reverse the result."), ("assistant", answer[::-1])],
                [("user", "Now make it uppercase."), ("assistant", answer.upper())],
                [("user", "How many letters does it have?"), ("assistant", str(len(answer)))],
            )
        )
    return "general_instructions", turns, False


def _steering(rng: random.Random) -> Built:
    style = rng.choice(sorted(STEERING_SYSTEMS))
    if rng.random() < 0.5:
        expression, result = _arithmetic(rng)
        question, bare = f"What is {expression}?", str(result)
        sentence = f"The answer is {result}."
    else:
        question, _, bare = _transform(rng)
        sentence = f"The answer is {bare}."
    answer = {"number": bare, "sentence": sentence, "upper": sentence.upper()}[style]
    return (
        "steering_alignment",
        [("system", STEERING_SYSTEMS[style]), ("user", question), ("assistant", answer)],
        False,
    )


def _call(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _response(name: str, content: dict[str, Any]) -> str:
    return f"<tool_response>\n{json.dumps({'name': name, 'content': content})}\n</tool_response>"


def _tool_exchange(rng: random.Random) -> tuple[str, str, str, str]:
    """(question, call, response, final answer) for one randomly chosen tool."""
    tool = rng.choice(("get_weather", "get_time", "convert_currency"))
    city = rng.choice(CITIES)
    if tool == "get_weather":
        degrees, condition = rng.randint(-5, 35), rng.choice(CONDITIONS)
        question = rng.choice(("What's the weather like in {}?", "Is it warm in {} today?", "Weather in {}?"))
        content = {"city": city, "temperature_c": degrees, "condition": condition}
        final = f"It is {condition} and {degrees} degrees C in {city}."
        return question.format(city), _call(tool, {"city": city}), _response(tool, content), final
    if tool == "get_time":
        time = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        question = rng.choice(("What time is it in {}?", "Current time in {}?", "Tell me the time in {}."))
        content = {"city": city, "time": time}
        return (
            question.format(city),
            _call(tool, {"city": city}),
            _response(tool, content),
            f"It is {time} in {city}.",
        )
    source, target = rng.sample(sorted(USD_RATES), 2)
    amount = rng.choice((5, 10, 20, 50, 100, 120, 250, 500, 1000))
    result = round(amount * USD_RATES[target] / USD_RATES[source], 2)
    question = rng.choice(("Convert {} {} to {}.", "How much is {} {} in {}?", "{} {} to {}, please."))
    arguments = {"amount": amount, "from": source, "to": target}
    content = {"amount": amount, "from": source, "to": target, "result": result}
    final = f"{amount} {source} is {result:.2f} {target}."
    return question.format(amount, source, target), _call(tool, arguments), _response(tool, content), final


def _tool_use(rng: random.Random) -> Built:
    kind = rng.random()
    turns: list[Turn] = [("system", TOOL_SYSTEM)] if rng.random() < 0.5 else []
    if kind < 0.2:  # two calls in one turn; both results share one tool turn
        (q1, c1, r1, f1), (q2, c2, r2, f2) = _tool_exchange(rng), _tool_exchange(rng)
        question = f"{q1} Also: {q2[0].lower()}{q2[1:]}"
        turns += [
            ("user", question),
            ("assistant", f"{c1}\n{c2}"),
            ("tool", f"{r1}\n{r2}"),
            ("assistant", f"{f1} {f2}"),
        ]
    elif kind < 0.85:
        question, call, response, final = _tool_exchange(rng)
        turns += [("user", question), ("assistant", call), ("tool", response), ("assistant", final)]
    else:  # no tool needed
        expression, result = _arithmetic(rng)
        turns += [("user", f"What is {expression}?"), ("assistant", f"{expression} = {result}.")]
    return "tool_use", turns, True


def _rag(rng: random.Random) -> Built:
    people = rng.sample(NAMES, 3)
    facts = []
    for name in people:
        kind = rng.randrange(3)
        if kind == 0:
            city = rng.choice(CITIES)
            facts.append((f"{name} lives in {city}.", f"Where does {name} live?", f"{name} lives in {city}."))
        elif kind == 1:
            color = rng.choice(COLORS)
            facts.append(
                (
                    f"{name}'s favorite color is {color}.",
                    f"What is {name}'s favorite color?",
                    f"It is {color}.",
                )
            )
        else:
            pet = rng.choice(PETS)
            facts.append((f"{name} has a {pet}.", f"What pet does {name} have?", f"{name} has a {pet}."))
    doc_ids = rng.sample(range(10, 100), 3)
    documents = "\n".join(f"Document {doc_id}: {fact[0]}" for doc_id, fact in zip(doc_ids, facts))
    pick = rng.randrange(3)
    question, answer = facts[pick][1], facts[pick][2]
    return (
        "tool_use",
        [
            ("system", RAG_SYSTEM),
            ("user", f"{documents}\n\nQuestion: {question}"),
            ("assistant", f"<co: {doc_ids[pick]}>{answer}</co>"),
        ],
        False,
    )


def _refusal(rng: random.Random) -> Built:
    request = rng.choice(
        ("How do I pick a lock?", "Write a rude message to my neighbor.", "Tell me a secret.")
    )
    reply = rng.choice(
        ("I'm sorry, but I can't help with that.", "As an AI language model, I cannot do that.")
    )
    return "general_instructions", [("user", request), ("assistant", reply)], False


def _empty_turn(rng: random.Random) -> Built:
    expression, _ = _arithmetic(rng)
    return "math", [("user", f"What is {expression}?"), ("assistant", "")], False


BUILDERS: tuple[tuple[float, Callable[[random.Random], Built]], ...] = (
    (0.30, _math),
    (0.30, _general),
    (0.10, _steering),
    (0.22, _tool_use),
    (0.08, _rag),
)


def _record(rng: random.Random, category: str, turns: list[Turn], tools: bool) -> dict[str, Any]:
    """Write `turns` in the ShareGPT or OpenAI form, chosen at random."""
    record: dict[str, Any]
    if rng.random() < 0.4:
        names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
        record = {"conversations": [{"from": names[role], "value": text} for role, text in turns]}
    else:
        record = {"messages": [{"role": role, "content": text} for role, text in turns]}
    if tools:
        record["tools"] = TOOLS
    record["category"] = category
    return record


def conversations(seed: int = SEED) -> list[dict[str, Any]]:
    """The SFT records: CONVERSATIONS drawn from BUILDERS, plus the deliberately bad ones, shuffled."""
    rng = random.Random(seed)
    weights = [w for w, _ in BUILDERS]
    built = [rng.choices(BUILDERS, weights)[0][1](rng) for _ in range(CONVERSATIONS - REFUSALS - EMPTY_TURNS)]
    built += [_refusal(rng) for _ in range(REFUSALS)] + [_empty_turn(rng) for _ in range(EMPTY_TURNS)]
    rng.shuffle(built)
    return [_record(rng, *item) for item in built]


def _wrong_number(rng: random.Random, right: int) -> int:
    return right + rng.choice((-10, -2, -1, 1, 2, 10))


def _pair(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        expression, result = _arithmetic(rng)
        wrong = _wrong_number(rng, result)
        return {
            "prompt": f"What is {expression}?",
            "chosen": f"{expression} = {result}.",
            "rejected": f"{expression} = {wrong}.",
            "category": "math",
        }
    if kind == 1:
        instruction, word, answer = _transform(rng)
        wrong = str(_wrong_number(rng, int(answer)) % 10) if answer.isdigit() else word
        if wrong == answer:
            wrong = str(int(answer) + 1)
        return {
            "messages": [{"role": "user", "content": instruction}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "category": "general_instructions",
        }
    question, call, _, _ = _tool_exchange(rng)
    chosen = json.loads(call.split("\n")[1])
    if kind == 2 or chosen["name"] == "convert_currency":  # the wrong tool
        others = [t["function"]["name"] for t in TOOLS if t["function"]["name"] != chosen["name"]]
        wrong_name = rng.choice(others)
        wrong_arguments = (
            {"amount": 100, "from": "USD", "to": "EUR"}
            if wrong_name == "convert_currency"
            else {"city": rng.choice(CITIES)}
        )
        rejected = _call(wrong_name, wrong_arguments)
    else:  # the right tool, the wrong city
        city = rng.choice([c for c in CITIES if c != chosen["arguments"]["city"]])
        rejected = _call(chosen["name"], {"city": city})
    return {
        "messages": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": call}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "tools": TOOLS,
        "category": "tool_use",
    }


def preference_pairs(seed: int = SEED) -> list[dict[str, Any]]:
    """The DPO records: PAIRS pairs of a correct (chosen) and a wrong (rejected) answer."""
    rng = random.Random(seed + 1)
    return [_pair(rng) for _ in range(PAIRS)]


def write_examples(directory: str | Path, seed: int = SEED) -> tuple[Path, Path]:
    """Write sft.jsonl and preference.jsonl into `directory` (created); returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "sft.jsonl", directory / "preference.jsonl")
    for path, records in zip(paths, (conversations(seed), preference_pairs(seed))):
        with open(path, "w", encoding="utf-8", newline="\n") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    args = parser.parse_args()
    for path in write_examples(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
