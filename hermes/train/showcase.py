"""What a run shows it learned: greedy answers to held-out prompts before and after training, scored, and
the validation loss at the start and the end, printed at the end of the run and written to
<run dir>/showcase.json; and, for DPO, the reward accuracies and margins of the first and last steps.

Held-out prompts (`held_out_prompts`): the first `logging.showcase_prompts` records of the run's validation
split (the records of data.train that data.validation_fraction holds out, never trained on, then
data.validation's), in file order, skipping those the content filters would drop (empty turns, refusals,
malformed tool calls). A prompt is the record's turns before its first assistant turn (system prompt and
tools included, rendered as in training); the expected answer is that assistant turn.

Scoring (`score_reply`), by the form of the expected answer; an answer is always also a format:

- Tool calls expected (tool_use: get_weather, get_time, convert_currency). Format: the reply is nothing but
  well-formed `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks calling the expected tools
  in the expected order. Answer: format, and every call has the expected arguments (JSON-equal).
- Text expected (math, string transforms, steering, tool_use questions that need no tool, RAG). The final
  answer is the text after a leading `<SCRATCHPAD> ... </SCRATCHPAD>` block (all of it without one), its
  whitespace runs made single spaces. Format: the reply opens with a scratchpad exactly when the expected
  one does (reasoning first), and its final answer has the expected one's shape (`shape`: every run of
  digits, of capitals and of small letters counted as one of its kind, the rest kept), so "5 * 12 = 61." has
  the form of "5 * 12 = 60.", "elppa" of a reversed word, "THE ANSWER IS 7." of an uppercase sentence and
  "<co: 31>Ada has a cat.</co>" of a citation, but "Units: 1." of none of them. Answer: format, and the
  final answer equals the expected one (case and punctuation count).

Either way a reply cut off at the token limit (no end of turn) has neither.

"Before" is the run's model at step 0 (its initial or loaded weights, an untrained adapter), "after" the
final one. Both are gathered whole from the shards onto every rank (`plain_copy`: for models one process
can hold, such as the tiny default's), which then answers its share of the prompts (greedy, a KV cache, the longest expected answer plus `SPARE_TOKENS` new tokens at most);
rank 0 collects the answers. The step-0 part (the validation loss and the answers before training) is
written to showcase.json at once, so a resumed run still reports it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hermes.config import Config, ConfigError, DataConfig
from hermes.data.chat_files import AnyChatFormat
from hermes.data.conversation import Conversation, Message
from hermes.data.filters import conversation_problem
from hermes.data.holdout import select_records, split_files
from hermes.data.loader import PackedLoader
from hermes.data.pipeline import bundled_example
from hermes.data.records import iter_records, parse_conversation
from hermes.data.sources import data_files
from hermes.generate import Reply, Sampling, parse_tool_calls, reply_batch
from hermes.model import Llama
from hermes.model.hf import is_dtensor
from hermes.model.lora import apply_lora, lora_layers, merge_lora
from hermes.train.build import Environment
from hermes.train.trainer import Trainer, ValidationSums

SHOWCASE_FILE = "showcase.json"
"""Where a run writes its showcase figures, in the run directory."""

SPARE_TOKENS = 16
"""New tokens allowed beyond the longest expected answer (in tokens), so a nearly right answer can finish."""

EXAMPLES = 5
"""Held-out answers printed at the end: the first prompt of each category, then the next ones."""

_SCRATCHPAD = re.compile(r"\s*<SCRATCHPAD>.*?</SCRATCHPAD>(.*)", re.DOTALL)
_RUNS = re.compile(r"[0-9]+|[A-Z]+|[a-z]+")
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)


# Held-out prompts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutPrompt:
    """A held-out record's turns before its first assistant turn, and that turn (the expected answer)."""

    source: str
    """The record's "path:line" (or "path:row N")."""
    category: str
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...]
    expected: str

    @property
    def question(self) -> str:
        """The last user turn of the prompt (what the report prints)."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


def held_out_prompts(options: DataConfig, count: int) -> list[HeldOutPrompt]:
    """The first `count` usable records of the validation split of `options` (module docstring), in order;
    fewer when the split holds fewer.

    Raises:
        ConfigError: there is no validation split (neither data.validation_fraction nor data.validation).
    """
    if not options.validation_fraction and not options.validation:
        raise ConfigError(
            "logging.showcase_prompts needs held-out prompts: set data.validation_fraction (e.g. 0.05) or "
            "data.validation, or turn the showcase off with --logging.showcase_prompts 0"
        )
    train = data_files([Path(p) for p in options.train] or [bundled_example("sft.jsonl")])
    index = {str(path): number for number, path in enumerate(train)}
    fraction = options.validation_fraction
    prompts: list[HeldOutPrompt] = []
    for path, selection in split_files(train, data_files(options.validation), fraction, "validation"):
        records = select_records(iter_records(path), str(path), index.get(str(path), -1), selection, fraction)
        for source, record in records:
            prompt = _prompt(parse_conversation(record, source))
            if prompt is not None:
                prompts.append(prompt)
                if len(prompts) == count:
                    return prompts
    return prompts


def _prompt(conversation: Conversation) -> HeldOutPrompt | None:
    """The prompt and expected answer of a conversation the filters keep; None for one they drop."""
    if conversation_problem(conversation) is not None:
        return None
    first = next(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    return HeldOutPrompt(
        conversation.source,
        conversation.category,
        conversation.messages[:first],
        conversation.tools,
        conversation.messages[first].content,
    )


# Scoring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """Whether a reply has the expected answer's format, and whether it is also the expected answer."""

    format: bool
    answer: bool


def final_answer(text: str) -> str:
    """The answer part of a reply: the text after a leading `<SCRATCHPAD> ... </SCRATCHPAD>` block (all of
    it without one), its whitespace runs made single spaces."""
    scratchpad = _SCRATCHPAD.fullmatch(text)
    return " ".join((scratchpad.group(1) if scratchpad else text).split())


def shape(text: str) -> str:
    """The form of a text: each run of digits becomes "0", of capitals "A", of small letters "a" (so "Ada
    is 7." is "Aa a 0."); other characters stay."""
    return _RUNS.sub(lambda run: "0" if run[0][0].isdigit() else "A" if run[0][0].isupper() else "a", text)


def score_reply(reply: str, expected: str, finished: bool = True) -> Score:
    """Score `reply` against the `expected` answer (rules in the module docstring).

    Args:
        reply: the generated reply (special tags as text).
        expected: the record's assistant turn.
        finished: whether the reply ended at an end of turn (False: cut off at the token limit).
    """
    if not finished:
        return Score(False, False)
    wanted, _ = parse_tool_calls(expected)
    if wanted:
        calls, problems = parse_tool_calls(reply)
        outside = _TOOL_CALL_BLOCK.sub("", reply).strip()
        form = not problems and not outside and [c.name for c in calls] == [c.name for c in wanted]
        return Score(form, form and [c.arguments for c in calls] == [c.arguments for c in wanted])
    got, want = final_answer(reply), final_answer(expected)
    reasoned = bool(_SCRATCHPAD.fullmatch(reply)) == bool(_SCRATCHPAD.fullmatch(expected))
    form = reasoned and shape(got) == shape(want)
    return Score(form, form and got == want)


# Answering -------------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_copy(net: nn.Module, device: torch.device) -> Llama:
    """A plain (unsharded) copy of the run's model `net` as it is now, on `device` in eval mode, its LoRA
    adapters merged. Collective: every rank gathers every tensor whole."""
    state = {
        name: t.full_tensor() if is_dtensor(t) else t.detach().clone() for name, t in net.state_dict().items()
    }
    with torch.device("meta"):
        copy = Llama(net.config)
    adapters = lora_layers(net)
    if adapters:
        layer = adapters[0][1]
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in adapters})
        apply_lora(copy, rank=layer.rank, alpha=layer.alpha, dropout=0.0, targets=targets)
    copy.load_state_dict(state, assign=True)
    if adapters:
        copy = merge_lora(copy)
    return copy.to(device).eval().requires_grad_(False)


def answer(
    model: Llama, chat: AnyChatFormat, prompts: Sequence[HeldOutPrompt], max_new_tokens: int
) -> list[Reply]:
    """Greedy replies (`hermes.generate.Reply`) to `prompts`, in order; prompts offering the same tools are
    generated in one batch."""
    groups: dict[str, list[int]] = {}
    for number, prompt in enumerate(prompts):
        groups.setdefault(json.dumps(prompt.tools, sort_keys=True), []).append(number)
    replies: dict[int, Reply] = {}
    for numbers in groups.values():
        batch = reply_batch(
            model,
            chat,
            [prompts[n].messages for n in numbers],
            prompts[numbers[0]].tools,
            Sampling(max_new_tokens=max_new_tokens),
        )
        replies.update(zip(numbers, batch))
    return [replies[n] for n in range(len(prompts))]


def answer_on_all_ranks(
    net: nn.Module, env: Environment, prompts: Sequence[HeldOutPrompt], max_new_tokens: int
) -> list[dict[str, Any]] | None:
    """Every prompt's greedy reply from the run's model as it is now, scored: {"reply", "finished",
    "format", "answer"} in prompt order on rank 0 (None elsewhere). Each rank answers every world-size-th
    prompt. Collective."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = plain_copy(net, env.device)
    mine = list(prompts[rank::world])
    rows = []
    for prompt, reply in zip(mine, answer(model, env.chat, mine, max_new_tokens) if mine else []):
        score = score_reply(reply.text, prompt.expected, reply.finished)
        rows.append({"reply": reply.text, "finished": reply.finished, **dataclasses.asdict(score)})
    del model
    gathered: list[list[dict[str, Any]]] | None = [[] for _ in range(world)] if rank == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if gathered is None:
        return None
    return [gathered[n % world][n // world] for n in range(len(prompts))]


def rates(rows: Sequence[dict[str, Any]], prompts: Sequence[HeldOutPrompt]) -> dict[str, Any]:
    """Format and answer rates of scored replies, overall and per category."""
    categories: dict[str, dict[str, int]] = {}
    for row, prompt in zip(rows, prompts):
        counts = categories.setdefault(prompt.category or "(none)", {"prompts": 0, "format": 0, "answer": 0})
        counts["prompts"] += 1
        counts["format"] += row["format"]
        counts["answer"] += row["answer"]
    total = max(1, len(rows))
    return {
        "format_rate": sum(r["format"] for r in rows) / total,
        "answer_rate": sum(r["answer"] for r in rows) / total,
        "by_category": categories,
    }


# The SFT run's showcase ------------------------------------------------------------------------------------


class Showcase:
    """The showcase of one SFT run (module docstring); inert when `logging.showcase_prompts` is 0.

    In the recipe: `Showcase(config, env)` before any data or model work (it reads the held-out prompts),
    `start(...)` right after the Trainer (at step 0: the validation loss and the answers before training),
    `end(trainer)` after the last step (the validation loss at the last step unless that step measured it,
    the answers after training), `report()` last (rank 0 prints the report and writes showcase.json).

    Raises:
        ConfigError: showcase prompts asked for without a validation split.
    """

    def __init__(self, config: Config, env: Environment) -> None:
        self.config, self.env = config, env
        self.path = config.run_dir / SHOWCASE_FILE
        count = config.logging.showcase_prompts
        self.prompts = held_out_prompts(config.data, count) if count else []
        longest = max((len(env.tokenizer.encode(p.expected)) for p in self.prompts), default=0)
        self.max_new_tokens = longest + SPARE_TOKENS
        self.record: dict[str, Any] = {}

    def start(
        self, net: nn.Module, trainer: Trainer, validation: PackedLoader | None, nll: ValidationSums
    ) -> None:
        """Before the first step of a fresh run: the validation loss and the scored answers of the model at
        step 0, written to showcase.json at once; a resumed run reads them back. Collective.

        Args:
            net: the parallelised model.
            trainer: the run's Trainer, before its first step.
            validation: the validation data's loader (there is one whenever there are held-out prompts).
            nll: the recipe's validation body (`Trainer.validate`).
        """
        self.net, self.validation, self.nll = net, validation, nll
        self.first_step = trainer.completed_steps
        if not self.prompts:
            return
        if trainer.completed_steps == 0:
            self._measure(trainer, "before", validate=True)
            if self.env.rank == 0:
                self._write()
        elif self.env.rank == 0 and self.path.is_file():
            self.record = {k: v for k, v in json.loads(self.path.read_text()).items() if k != "after"}

    def end(self, trainer: Trainer) -> None:
        """After the last step: the validation loss at the last step (measured unless the step just did)
        and the answers after training. Nothing when the run stopped early or had no step left to do.
        Collective."""
        steps = trainer.completed_steps
        if not self.prompts or steps != trainer.total_steps or steps == self.first_step:
            return
        self._measure(trainer, "after", validate=not trainer.validation_due)

    def _measure(self, trainer: Trainer, stage: str, validate: bool) -> None:
        """The validation loss (measured, or the last one logged) and the scored answers of the model as
        it is now, kept on rank 0."""
        loss = trainer.validate(self.validation, self.nll) if validate else None
        rows = answer_on_all_ranks(self.net, self.env, self.prompts, self.max_new_tokens)
        if rows is None:
            return
        if loss is None:
            loss = _last_val_loss(self.config.run_dir / "metrics.jsonl")
        self.record.setdefault("prompts", [_prompt_record(p) for p in self.prompts])
        key = "start" if stage == "before" else "end"
        self.record.setdefault("val_loss", {})[key] = {"step": trainer.completed_steps, "value": loss}
        self.record[stage] = {"step": trainer.completed_steps, **rates(rows, self.prompts), "replies": rows}

    def report(self) -> None:
        """Rank 0: write showcase.json and print the report (when `end` measured the final model)."""
        if self.env.rank != 0 or "after" not in self.record:
            return
        self._write()
        print(format_report(self.record, self.path), flush=True)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=1) + "\n")


def _prompt_record(prompt: HeldOutPrompt) -> dict[str, str]:
    return {
        "source": prompt.source,
        "category": prompt.category,
        "question": prompt.question,
        "expected": prompt.expected,
    }


def _last_val_loss(metrics: Path) -> float | None:
    """The last val_loss logged in a metrics.jsonl."""
    losses = [r["val_loss"] for r in _records(metrics) if "val_loss" in r]
    return losses[-1] if losses else None


def _records(metrics: Path) -> Iterator[dict[str, Any]]:
    for line in metrics.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def _short(text: str, width: int = 90) -> str:
    """One line of at most `width` characters (newlines shown as \\n)."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def _examples(prompts: Sequence[dict[str, Any]], count: int) -> list[int]:
    """Indices of the first prompt of each category, then of the next ones, `count` in all, in order."""
    firsts: dict[str, int] = {}
    for number, prompt in enumerate(prompts):
        firsts.setdefault(prompt["category"], number)
    chosen = list(firsts.values())[:count]
    chosen += [n for n in range(len(prompts)) if n not in chosen][: count - len(chosen)]
    return sorted(chosen)


def format_report(record: dict[str, Any], path: Path) -> str:
    """The end-of-run report of a showcase record (see `Showcase`)."""
    before, after, losses = record.get("before"), record["after"], record["val_loss"]

    def figure(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def change(key: str, digits: int = 2, stages: tuple = (before, after)) -> str:
        return " -> ".join(figure(stage[key] if stage else None, digits) for stage in stages)

    start, end = losses.get("start", {}), losses["end"]
    lines = [
        f"Showcase: {len(record['prompts'])} held-out prompts (never trained on), greedy answers before -> "
        "after training",
        f"  validation loss  {figure(start.get('value'), 4)} (step {start.get('step', 0)}) -> "
        f"{figure(end['value'], 4)} (step {end['step']})",
        f"  format rate      {change('format_rate')}",
        f"  answer rate      {change('answer_rate')}",
    ]
    for category, counts in after["by_category"].items():
        was = before["by_category"].get(category) if before else None
        then = f"{was['format']}/{was['answer']}" if was else "n/a"
        lines.append(
            f"    {category:<22} format/answer {then} -> {counts['format']}/{counts['answer']} of "
            f"{counts['prompts']}"
        )
    lines.append("Held-out prompts, the expected answer and the greedy answers:")
    for number in _examples(record["prompts"], EXAMPLES):
        prompt, reply = record["prompts"][number], after["replies"][number]
        marks = f"format {'yes' if reply['format'] else 'no'}, answer {'yes' if reply['answer'] else 'no'}"
        lines.append(f"  [{prompt['category']}] {_short(prompt['question'])}")
        lines.append(f"    expected: {_short(prompt['expected'])}")
        if before:
            lines.append(f"    before:   {_short(before['replies'][number]['reply'])}")
        lines.append(f"    after:    {_short(reply['reply'])}  ({marks})")
    lines.append(f"Figures and every reply: {path}")
    return "\n".join(lines)


# The DPO run's summary -------------------------------------------------------------------------------------

DPO_SUMMARY_STEPS = 5
"""Steps averaged at each end of a DPO run for its summary."""


def dpo_summary(run_dir: Path, steps: int = DPO_SUMMARY_STEPS) -> dict[str, Any]:
    """Mean rewards/accuracies and rewards/margins (and loss) of a DPO run's first and last `steps` steps
    (fewer when the run has under twice as many), from its metrics.jsonl.

    Raises:
        ValueError: the metrics hold no DPO step.
    """
    records = [r for r in _records(run_dir / "metrics.jsonl") if "rewards/margins" in r]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no DPO step (no rewards/margins)")

    def mean(part: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("loss", "rewards/accuracies", "rewards/margins")
        figures = {key: sum(r[key] for r in part) / len(part) for key in keys}
        return {"steps": [part[0]["step"], part[-1]["step"]], **figures}

    steps = max(1, min(steps, len(records) // 2))  # the two ends apart when the run is short
    return {"first": mean(records[:steps]), "last": mean(records[-steps:])}


def report_dpo(run_dir: Path) -> None:
    """Rank 0: print a DPO run's summary (`dpo_summary`) and write it to <run dir>/showcase.json."""
    if dist.get_rank() != 0:
        return
    summary = dpo_summary(run_dir)
    (run_dir / SHOWCASE_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "DPO summary (means over steps; accuracy = share of pairs whose chosen reward beats the rejected):"
    ]
    for key in ("first", "last"):
        part = summary[key]
        lines.append(
            f"  steps {part['steps'][0]:>3}-{part['steps'][1]:<3}  rewards/accuracies "
            f"{part['rewards/accuracies']:.3f}  rewards/margins {part['rewards/margins']:.4f}  loss "
            f"{part['loss']:.4f}"
        )
    print("\n".join(lines), flush=True)
