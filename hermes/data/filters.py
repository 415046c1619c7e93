"""Dropping bad records, counting every drop, and mixing categories to target token shares.

The Hermes 3 report filters its SFT data by token-length thresholds, removes refusals and badly formatted
responses, and removes conversations with missing or empty turns. Here:

- Content filters (on Conversations and PreferencePairs, before rendering), checked in this order, a record
  counted under the first reason it fails:
  `empty_turn` (a turn whose content is empty or whitespace), `no_assistant_turn`, `bad_turn_order` (see
  TURN_ORDER_RULE), `malformed_tool_call` (see `tool_calls_well_formed`), `unknown_tool` (a call to a
  function missing from the record's non-empty `tools` list), `refusal` (an assistant turn containing a
  refusal phrase, case-insensitively; typographic apostrophes count as plain ones).
- Token filters (on rendered Samples): `too_short` (fewer than min_tokens), `too_long` (more than
  max_tokens), `no_trained_tokens` (`sample.trained_tokens == 0`).

Nothing is dropped silently: each filter records every record it sees in a FilterSummary, which prints as a
table (`format()`) and writes `filter_summary.json` into the run directory (`write()`). The seq_len stage of
the pipeline also counts there the samples it truncated to fit.

The mixture (`mix`) resamples categories to target token shares; see its docstring.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.records import tool_name
from hermes.data.sample import Sample

DEFAULT_REFUSAL_PHRASES = (
    "I'm sorry, but I can't",
    "I'm sorry, but I cannot",
    "I am sorry, but I cannot",
    "I apologize, but I cannot",
    "I apologize, but I can't",
    "I cannot help with",
    "I can't help with",
    "I cannot assist with",
    "I can't assist with",
    "I cannot fulfill",
    "I can't fulfill",
    "I cannot comply",
    "I am unable to comply",
    "I'm unable to help with",
    "I must decline",
    "As an AI language model",
    "As an AI developed by",
    "against my programming",
)
"""Refusal phrases matched anywhere in an assistant turn (case-insensitive)."""

TURN_ORDER_RULE = (
    "at most one system turn, first; then a user turn; a user turn is followed by an assistant turn; an "
    "assistant turn by a user or tool turn; a tool turn by a tool or assistant turn; the last turn is an "
    "assistant turn"
)
"""The rule `bad_turn_order` enforces (for a preference pair: on prompt + chosen and prompt + rejected)."""

_NEXT_ROLES = {
    "start": {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}

HERMES3_MIXTURE = {
    "general_instructions": 60.6,
    "domain_expert": 12.8,
    "math": 6.7,
    "roleplaying": 6.1,
    "coding": 4.5,
    "tool_use": 4.3,
    "content_generation": 3.0,
    "steering_alignment": 2.5,
}
"""The Hermes 3 SFT mixture by tokens, in percent as the report prints it (the shares add to 100.5; `mix`
normalises weights). Category "tool_use" covers tool use, agentic and RAG data."""

_TOOL_TAG = re.compile(r"<(/?)tool_call>")


@dataclass(frozen=True)
class ContentFilters:
    """Which content filters run. The turn checks (empty, missing assistant, order) always run."""

    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSAL_PHRASES
    """Drop a record whose assistant turns contain one of these; () turns the refusal filter off."""
    check_tool_calls: bool = True
    """Drop a record with a malformed `<tool_call>` or a call to a tool it does not offer."""


@dataclass
class _Stage:
    seen: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int | None = None
    """Kept records that were cut to fit; None for a stage that never cuts."""
    truncated_examples: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.seen - sum(self.dropped.values())


@dataclass
class FilterSummary:
    """Counts of records seen, kept and dropped per reason, per filtering stage, in the order stages ran;
    for a stage that cuts records to fit (seq_len), also how many kept records it cut.

    Args:
        max_examples: how many sources ("path:line") to keep per reason as examples.
    """

    max_examples: int = 3
    stages: dict[str, _Stage] = field(default_factory=dict)

    def add(self, stage: str, source: str, reason: str | None, *, truncated: bool | None = None) -> None:
        """Count one record seen by `stage`: kept when `reason` is None, else dropped for `reason`.

        A stage that cuts records to fit passes `truncated` with every record: whether this one was cut.
        """
        counts = self.stages.get(stage)
        if counts is None:
            counts = self.stages[stage] = _Stage()
        counts.seen += 1
        if reason is not None:
            counts.dropped[reason] += 1
            examples = counts.examples.setdefault(reason, [])
            if len(examples) < self.max_examples:
                examples.append(source)
        if truncated is not None:
            counts.truncated = (counts.truncated or 0) + int(truncated)
            if truncated and len(counts.truncated_examples) < self.max_examples:
                counts.truncated_examples.append(source)

    def merge(self, other: FilterSummary) -> None:
        """Count `other`'s records after this summary's, as if they had been added here one by one: stages
        keep the order they first ran in, and the examples are the first ones in record order."""
        for name, theirs in other.stages.items():
            counts = self.stages.get(name)
            if counts is None:
                counts = self.stages[name] = _Stage()
            counts.seen += theirs.seen
            counts.dropped.update(theirs.dropped)
            for reason, sources in theirs.examples.items():
                examples = counts.examples.setdefault(reason, [])
                examples += sources[: max(0, self.max_examples - len(examples))]
            if theirs.truncated is not None:
                counts.truncated = (counts.truncated or 0) + theirs.truncated
                room = max(0, self.max_examples - len(counts.truncated_examples))
                counts.truncated_examples += theirs.truncated_examples[:room]

    def kept(self, stage: str) -> int:
        """Records `stage` let through."""
        return self.stages[stage].kept

    def dropped(self, stage: str) -> dict[str, int]:
        """Drops of `stage` per reason."""
        return dict(self.stages[stage].dropped)

    def truncated(self, stage: str) -> tuple[int, list[str]]:
        """How many records `stage` kept but cut to fit, and example sources ((0, []) for a stage that
        never cuts or never ran)."""
        counts = self.stages.get(stage)
        if counts is None or counts.truncated is None:
            return 0, []
        return counts.truncated, list(counts.truncated_examples)

    def to_dict(self) -> dict[str, Any]:
        """{stage: {"seen", "kept", "dropped": {reason: count}, "examples": {reason: [source, ...]}}}; a stage
        that cuts records to fit also has "truncated" (count) and "truncated_examples" ([source, ...])."""
        return {name: _stage_dict(s) for name, s in self.stages.items()}

    def format(self) -> str:
        """A readable table: one line per stage, then one per drop reason with example sources."""
        rows = [("stage", "seen", "kept", "dropped", "reason", "examples")]
        for name, s in self.stages.items():
            rows.append((name, str(s.seen), str(s.kept), str(s.seen - s.kept), "", ""))
            for reason, count in s.dropped.most_common():
                rows.append(("", "", "", str(count), reason, ", ".join(s.examples[reason])))
        return _table(rows, numeric=(1, 2, 3))

    def write(self, directory: str | Path) -> Path:
        """Write `filter_summary.json` (the `to_dict()` form) into `directory`; returns its path."""
        return _write_json(Path(directory) / "filter_summary.json", self.to_dict())


def _stage_dict(stage: _Stage) -> dict[str, Any]:
    """The `FilterSummary.to_dict` entry of one stage."""
    entry: dict[str, Any] = {
        "seen": stage.seen,
        "kept": stage.kept,
        "dropped": dict(stage.dropped.most_common()),
        "examples": {reason: stage.examples[reason] for reason, _ in stage.dropped.most_common()},
    }
    if stage.truncated is not None:
        entry["truncated"] = stage.truncated
        entry["truncated_examples"] = stage.truncated_examples
    return entry


def tool_calls_well_formed(text: str) -> bool:
    """Whether every `<tool_call>` in `text` is closed before the next opens, every `</tool_call>` closes one,
    and each body is a JSON object with a string "name" and an object "arguments"."""
    return _tool_calls(text) is not None


def conversation_problem(
    conversation: Conversation, filters: ContentFilters = ContentFilters()
) -> str | None:
    """The first content reason `conversation` fails (see the module docstring), or None to keep it."""
    return _turns_problem(conversation.messages) or _content_problem(
        conversation.messages, conversation.tools, filters
    )


def pair_problem(pair: PreferencePair, filters: ContentFilters = ContentFilters()) -> str | None:
    """The first content reason `pair` fails, or None. Turn checks cover prompt + chosen and prompt +
    rejected; tool-call and refusal checks cover the chosen side only (a bad rejected side is the point)."""
    return (
        _turns_problem(pair.prompt + pair.chosen)
        or _turns_problem(pair.prompt + pair.rejected)
        or _content_problem(pair.chosen, pair.tools, filters)
    )


def sample_problem(sample: Sample, min_tokens: int = 0, max_tokens: int = 0) -> str | None:
    """The first token reason `sample` fails (`too_short`, `too_long`, `no_trained_tokens`), or None.
    A limit of 0 is off."""
    if len(sample) < min_tokens:
        return "too_short"
    if max_tokens and len(sample) > max_tokens:
        return "too_long"
    if sample.trained_tokens == 0:
        return "no_trained_tokens"
    return None


def filter_conversations(
    conversations: Iterable[Conversation],
    summary: FilterSummary,
    filters: ContentFilters = ContentFilters(),
    stage: str = "records",
) -> Iterator[Conversation]:
    """Yield the conversations that pass the content filters, counting each one in `summary` under `stage`
    as it is consumed."""
    return _counted(
        conversations, lambda conversation: conversation_problem(conversation, filters), summary, stage
    )


def filter_pairs(
    pairs: Iterable[PreferencePair],
    summary: FilterSummary,
    filters: ContentFilters = ContentFilters(),
    stage: str = "records",
) -> Iterator[PreferencePair]:
    """Yield the preference pairs that pass `pair_problem`, counting each in `summary` under `stage`."""
    return _counted(pairs, lambda pair: pair_problem(pair, filters), summary, stage)


def _counted(records: Iterable, problem, summary: FilterSummary, stage: str) -> Iterator:
    """Yield the records `problem` finds nothing wrong with, counting each in `summary` under `stage`."""
    for record in records:
        reason = problem(record)
        summary.add(stage, record.source, reason)
        if reason is None:
            yield record


def filter_samples(
    samples: Iterable[tuple[str, Sample]],
    summary: FilterSummary,
    min_tokens: int = 0,
    max_tokens: int = 0,
    stage: str = "samples",
) -> Iterator[tuple[str, Sample]]:
    """Yield the (source, sample) pairs that pass `sample_problem`, counting each in `summary` under `stage`."""
    for source, sample in samples:
        reason = sample_problem(sample, min_tokens, max_tokens)
        summary.add(stage, source, reason)
        if reason is None:
            yield source, sample


@dataclass(frozen=True)
class CategoryShare:
    """What the mixture did to one category (tokens as measured by the `lengths` given to `mix`)."""

    category: str
    weight: float
    """Target share of the mixed tokens (the weights normalised to sum to 1)."""
    samples: int
    tokens: int
    selected_samples: int
    """Samples in the mixture, repeats counted."""
    selected_tokens: int


@dataclass(frozen=True)
class Mixture:
    """The result of `mix`: sample indices (sorted, an index repeated once per copy) and per-category counts."""

    indices: list[int]
    categories: tuple[CategoryShare, ...]

    def to_dict(self) -> dict[str, Any]:
        """{category: {"weight", "samples", "tokens", "selected_samples", "selected_tokens"}}."""
        return {
            c.category: {
                "weight": c.weight,
                "samples": c.samples,
                "tokens": c.tokens,
                "selected_samples": c.selected_samples,
                "selected_tokens": c.selected_tokens,
            }
            for c in self.categories
        }

    def format(self) -> str:
        """A readable table of target and achieved token shares per category."""
        total = sum(c.selected_tokens for c in self.categories) or 1
        rows = [("category", "target", "achieved", "samples", "selected", "tokens", "selected tokens")]
        for c in self.categories:
            rows.append(
                (
                    repr(c.category) if not c.category else c.category,
                    f"{c.weight:.1%}",
                    f"{c.selected_tokens / total:.1%}",
                    str(c.samples),
                    str(c.selected_samples),
                    str(c.tokens),
                    str(c.selected_tokens),
                )
            )
        return _table(rows, numeric=(1, 2, 3, 4, 5, 6))

    def write(self, directory: str | Path) -> Path:
        """Write `mixture_summary.json` (the `to_dict()` form) into `directory`; returns its path."""
        return _write_json(Path(directory) / "mixture_summary.json", self.to_dict())


def mix(
    categories: Sequence[str],
    lengths: Sequence[int],
    weights: Mapping[str, float],
    seed: int,
    total_tokens: int | None = None,
) -> Mixture:
    """Resample samples by category so that each category's share of tokens matches its weight.

    Semantics: weights are target token shares, normalised to sum to 1. The mixture has `total_tokens`
    tokens (default: as many as the data holds in the categories of non-zero weight, so the data's size is
    kept). Category c gets about weight_c * total tokens: its samples are shuffled (seeded by `seed` and the
    category) and taken in that order, cycling through the shuffle again as often as needed, while a sample
    brings the category's tokens closer to its target. So a category with more data than its share is
    subsampled, one with less is repeated (every sample k or k + 1 times), and the achieved share is off by at
    most half a sample per category. A weight of 0 drops the category. Deterministic given the seed.

    Args:
        categories: category of each sample ("" for records without one).
        lengths: token count of each sample.
        weights: category -> weight (non-negative; e.g. HERMES3_MIXTURE).
        seed: shuffling seed.
        total_tokens: tokens of the mixture; None = the tokens of the categories of non-zero weight.

    Returns:
        A Mixture: sorted sample indices (the loader shuffles) and per-category counts.

    Raises:
        ValueError: a negative or non-finite weight, weights summing to 0, a category present in the data
            but not in `weights` (give it a weight; 0 drops it), a positive weight for a category with no
            samples or no tokens, or lengths not matching categories.
    """
    if len(categories) != len(lengths):
        raise ValueError(
            f"mix: {len(categories)} categories but {len(lengths)} lengths; give one of each per sample"
        )
    for category, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"mixture weight of category {category!r} is {weight}; use a finite number >= 0")
    norm = sum(weights.values())
    if norm <= 0:
        raise ValueError("mixture weights sum to 0; give at least one category a positive weight")
    members: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        members.setdefault(category, []).append(i)
    unweighted = sorted(set(members) - set(weights))
    if unweighted:
        counts = ", ".join(f"{c!r} ({len(members[c])} samples)" for c in unweighted)
        raise ValueError(
            f"categories {counts} are in the data but not in the mixture weights; give each a weight "
            "(0 drops it); records without a category have category ''"
        )
    available = {c: sum(lengths[i] for i in members.get(c, [])) for c in weights}
    for category, weight in weights.items():
        if weight > 0 and available[category] == 0:
            raise ValueError(
                f"mixture weight {weight} for category {category!r}, which has no tokens in the data; "
                "set it to 0, remove it, or add data of that category"
            )
    total = sum(available[c] for c in weights if weights[c] > 0) if total_tokens is None else total_tokens
    indices: list[int] = []
    shares = []
    for category in sorted(weights):
        target = weights[category] / norm * total
        order = list(members.get(category, []))
        random.Random(f"{seed}:{category}").shuffle(order)
        taken: list[int] = []
        tokens = 0
        for i in itertools.cycle(order):
            if target <= 0 or tokens + lengths[i] / 2 >= target:
                break
            taken.append(i)
            tokens += lengths[i]
        indices.extend(taken)
        shares.append(
            CategoryShare(
                category, weights[category] / norm, len(order), available[category], len(taken), tokens
            )
        )
    return Mixture(sorted(indices), tuple(shares))


def _turns_problem(messages: Sequence[Message]) -> str | None:
    roles = []
    for message in messages:
        if not message.content or message.content.isspace():
            return "empty_turn"
        roles.append(message.role)
    if "assistant" not in roles:
        return "no_assistant_turn"
    previous = "start"
    for role in roles:
        if role not in _NEXT_ROLES[previous]:
            return "bad_turn_order"
        previous = role
    return None if previous == "assistant" else "bad_turn_order"


def _content_problem(
    messages: Sequence[Message], tools: Sequence[dict[str, Any]], filters: ContentFilters
) -> str | None:
    answers = [m.content for m in messages if m.role == "assistant"]
    if filters.check_tool_calls:
        calls = [_tool_calls(text) for text in answers]
        if None in calls:
            return "malformed_tool_call"
        names = [call["name"] for c in calls for call in c]
        if tools and names and not {tool_name(schema) for schema in tools}.issuperset(names):
            return "unknown_tool"
    if filters.refusal_phrases:
        refusal = _refusal_pattern(tuple(filters.refusal_phrases))
        for text in answers:
            if refusal.search(_fold(text)):
                return "refusal"
    return None


@functools.lru_cache(maxsize=16)
def _refusal_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """A regex that finds any of the folded `phrases` in a folded text: one scan of each assistant turn
    instead of one per phrase."""
    return re.compile("|".join(re.escape(_fold(phrase)) for phrase in phrases))


def _tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The tool calls of an assistant turn, or None when any is malformed."""
    if "tool_call>" not in text:  # no tag: the common turn, spared the regex scan
        return []
    calls = []
    opened_at = None
    for tag in _TOOL_TAG.finditer(text):
        closing = tag.group(1) == "/"
        if closing == (opened_at is None):
            return None  # a close without an open, or an open inside an open call
        if not closing:
            opened_at = tag.end()
            continue
        try:
            call = json.loads(text[opened_at : tag.start()])
        except json.JSONDecodeError:
            return None
        if not (
            isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), dict)
        ):
            return None
        calls.append(call)
        opened_at = None
    return calls if opened_at is None else None


def _fold(text: str) -> str:
    return text.replace("\u2019", "'").casefold()


def _table(rows: list[tuple[str, ...]], numeric: tuple[int, ...]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
