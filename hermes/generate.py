"""Generation: loading a trained model, batched decoding with a KV cache, and Hermes tool calls.

- `load_model(source, adapter)`: a run directory (its newest complete DCP checkpoint), a Hugging Face or Meta
  checkpoint directory or an FP8 export, and optionally a PEFT LoRA adapter on top (merged for speed); with
  `fp8=True`, the FP8 simulation of it.
- `generate(model, prompts, ...)`: prompts of different lengths decode together, left-padded, each with its
  positions counted from its own first token; greedy or temperature / top-p sampling; each sequence ends at
  its first stop id.
- `parse_tool_calls(text)`: the `<tool_call>{json}</tool_call>` calls of an assistant reply, problems reported
  rather than raised; `add_tool_results` feeds results back as `tool` messages (one tool turn when rendered).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermes.config import Config, load_run_config
from hermes.data.chat_files import AnyChatFormat, read_chat_format
from hermes.data.conversation import Message
from hermes.model import Llama, LlamaConfig
from hermes.model.fp8_checkpoint import is_fp8_checkpoint, read_fp8_checkpoint
from hermes.model.fp8_linear import QuantizedWeight, apply_fp8
from hermes.model.hf import load_pretrained
from hermes.model.lora import apply_lora, load_adapter, merge_lora
from hermes.parallel.checkpoint import checkpointed_model_names, latest_checkpoint, load_model_only

RUN_CONFIG_FILE = "config.toml"
"""The resolved configuration a training run writes into its directory; its presence marks a run directory."""

# Loading --------------------------------------------------------------------------------------------------


def load_model(
    source: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    fp8: bool = False,
) -> Llama:
    """A model ready for inference (eval mode, no gradients), from a training run or a checkpoint directory.

    Args:
        source: a run directory (holding config.toml and checkpoints/step-N): its newest complete checkpoint
            is loaded through DCP into the model that config.toml describes (for a LoRA run, the base named by
            model.checkpoint plus the checkpoint's adapter, merged); a Hugging Face / Meta checkpoint
            directory (`hermes.model.hf.load_pretrained`); or an FP8 (compressed-tensors) export, whose
            projections are dequantised (`hermes.model.fp8_checkpoint`).
        adapter: a PEFT LoRA adapter directory to load on top and merge (`hermes.model.lora.load_adapter`).
        device: where the parameters go.
        dtype: floating-point dtype of the parameters; None keeps the checkpoint's.
        fp8: simulate FP8 inference (`hermes.model.fp8_linear.apply_fp8`): the block projections in float8,
            quantised from the weights in `dtype` (an FP8 export's own float8 weights when `source` is one
            and no adapter changes them).

    Raises:
        FileNotFoundError: `source` is neither layout, or a run directory without a complete checkpoint.
        ValueError: a checkpoint that does not fit the model its run's config.toml describes.
    """
    source = Path(source)
    stored: dict[str, QuantizedWeight] = {}
    if (source / RUN_CONFIG_FILE).is_file():
        model = _load_run(source)
    elif is_fp8_checkpoint(source):
        checkpoint = read_fp8_checkpoint(source)
        model, stored = checkpoint.dequantized_model(), checkpoint.quantized
    else:
        model = load_pretrained(source)
    if adapter is not None:
        model, stored = merge_lora(load_adapter(model, adapter)), {}
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if fp8:
        apply_fp8(model, stored)
    return model


def load_chat_format(source: str | os.PathLike) -> AnyChatFormat:
    """The chat format (tokenizer, template) of a model `load_model` reads from `source`: a run's configured
    one, else the checkpoint directory's own (tokenizer.json / tokenizer.model and tokenizer_config.json,
    whose template's default system prompt is kept when hermes exported it), else the default Llama 3
    tokenizer in the Hermes format."""
    source = Path(source)
    if (source / RUN_CONFIG_FILE).is_file():
        config = load_run_config(source / RUN_CONFIG_FILE)
        return read_chat_format(
            config.model.checkpoint or None,
            tokenizer_path=config.tokenizer.path or None,
            chat_template=config.data.chat_template,
            default_system_prompt=config.data.default_system_prompt,
        )
    return read_chat_format(source)


def _load_run(run_dir: Path) -> Llama:
    """The newest complete checkpoint of a run, in the model its config.toml describes."""
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(
            f"{run_dir} has no complete checkpoint under checkpoints/ (step-N with a COMPLETE marker); "
            "train longer or point --model at an exported Hugging Face directory such as "
            f"{run_dir / 'hf'}"
        )
    config = load_run_config(run_dir / RUN_CONFIG_FILE)
    stored = checkpointed_model_names(checkpoint)
    adapted = any(".lora_A." in name for name in stored)
    model = _run_base_model(config, needs_values=adapted)
    if adapted:
        lora = config.lora
        apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets))
    state = model.state_dict()
    strangers = sorted(stored - state.keys())
    # A LoRA run's checkpoint leaves the frozen base out; any other must hold every weight.
    missing = sorted(name for name, p in model.named_parameters() if name not in stored and p.requires_grad)
    if strangers or missing:
        problems = []
        if strangers:
            problems.append(f"it holds tensors the model lacks ({', '.join(strangers[:5])})")
        if missing:
            problems.append(f"it lacks trained tensors ({', '.join(missing[:5])})")
        raise ValueError(
            f"{checkpoint} does not fit the model {run_dir / RUN_CONFIG_FILE} describes: "
            f"{'; '.join(problems)}. Keep the run's config.toml as the run wrote it."
        )
    load_model_only(checkpoint, model, stored)
    return merge_lora(model) if adapted else model


def _run_base_model(config: Config, needs_values: bool) -> Llama:
    """The model a run starts from: its model.checkpoint (read in full, even when the run's checkpoint then
    replaces every weight), else the preset (initialised as the run did when `needs_values`, i.e. when the
    checkpoint holds only an adapter; otherwise left uninitialised)."""
    dtype = getattr(torch, config.model.dtype)
    if config.model.checkpoint:
        return load_pretrained(config.model.checkpoint, dtype=dtype)
    shape = LlamaConfig.preset(config.model.preset)
    if needs_values:
        with torch.random.fork_rng(devices=[]):  # seeded as the run seeded it, the caller's RNG untouched
            torch.manual_seed(config.run.seed)
            return Llama(shape).to(dtype)
    with torch.device("meta"):
        model = Llama(shape)
    return model.to_empty(device="cpu").to(dtype)


# Decoding -------------------------------------------------------------------------------------------------


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row of `logits` [batch, vocab].

    Args:
        logits: scores of the next token.
        temperature: 0 takes the most likely token (greedy); otherwise tokens are drawn from
            softmax(logits / temperature).
        top_p: nucleus sampling: draw only among the most likely tokens whose probabilities, taken in
            decreasing order, first reach `top_p` in total (the most likely token is always kept).
        generator: the random generator draws come from (None: torch's global one).

    Returns:
        [batch] token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt, all in one batch, with a KV cache.

    Prompts are left-padded to the longest; each row's positions count from its own first token and its
    padding is never attended to, so a prompt continues as it would alone. The prompt is processed in one
    forward pass, then one token per step.

    Args:
        model: the model (its mode is restored afterwards).
        prompts: token ids of each prompt (at least one token each).
        max_new_tokens: the most tokens generated per prompt.
        temperature: 0 for greedy decoding; else the sampling temperature.
        top_p: nucleus sampling mass (see `sample_next`); 1 samples from the whole distribution.
        stop_ids: a sequence ends at the first of these it generates (e.g. `ChatFormat.stop_ids`).
        seed: seeds the sampling generator, so that a run repeats; None draws from torch's global generator.
        pad_id: the token put in the (masked) padding positions.

    Returns:
        The new tokens of each prompt, in order, without the stop id and without padding. A list shorter
        than `max_new_tokens` means that the sequence stopped.

    Raises:
        ValueError: no prompts, an empty prompt, or a setting out of range (each named).
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"max_new_tokens must be >= 0 (got {max_new_tokens}), temperature >= 0 (got {temperature}) and "
            f"top_p in (0, 1] (got {top_p})"
        )
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return results
    device = model.output.weight.device
    longest = max(len(prompt) for prompt in prompts)
    padding = [longest - len(prompt) for prompt in prompts]
    tokens = torch.tensor(
        [[pad_id] * pad + list(prompt) for pad, prompt in zip(padding, prompts)],
        dtype=torch.long,
        device=device,
    )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    running = list(range(len(prompts)))
    with _inference(model):
        # The last new token is never fed back, hence one position less than prompt + new tokens.
        cache = model.new_cache(len(prompts), longest + max_new_tokens - 1, padding=padding)
        for _ in range(max_new_tokens):
            hidden = model.hidden_states(tokens, cache=cache)[:, -1]  # [batch, dim]
            tokens = sample_next(model.output(hidden), temperature, top_p, generator)
            stopped = torch.isin(tokens, stops).tolist()
            chosen = tokens.tolist()
            for row in list(running):
                if stopped[row]:
                    running.remove(row)
                else:
                    results[row].append(chosen[row])
            if not running:
                break
            tokens = tokens[:, None]
    return results


# Tool calls -----------------------------------------------------------------------------------------------

_TOOL_CALL_TAG = re.compile(r"<(/?)tool_call>")


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant reply: `{"name": ..., "arguments": {...}}`."""

    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """Every well-formed `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` of an assistant reply.

    Nothing is raised: each malformed call (body not JSON, not an object, no string "name", no object
    "arguments"), each `<tool_call>` left open (at the end, or when another opens first) and each
    `</tool_call>` that closes nothing is described in `problems`, and the well-formed calls are still returned.

    Args:
        text: the decoded reply, tags as text.

    Returns:
        (calls in order, problems in order of position).
    """
    calls: list[ToolCall] = []
    problems: list[str] = []
    opened: re.Match[str] | None = None
    for tag in _TOOL_CALL_TAG.finditer(text):
        if tag.group(1) == "/":
            if opened is None:
                problems.append(f"</tool_call> at character {tag.start()} closes no <tool_call>")
                continue
            call, problem = _tool_call(text[opened.end() : tag.start()])
            if problem:
                problems.append(f"tool call at character {opened.start()}: {problem}")
            else:
                calls.append(call)
            opened = None
        else:
            if opened is not None:
                problems.append(
                    f"<tool_call> at character {opened.start()} is not closed before the next one opens "
                    f"(character {tag.start()})"
                )
            opened = tag
    if opened is not None:
        problems.append(f"<tool_call> at character {opened.start()} is never closed (no </tool_call>)")
    return calls, problems


def _tool_call(body: str) -> tuple[ToolCall | None, str]:
    """The call a `<tool_call>` body holds, or None and what is wrong with it."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at character {err.pos} of the body)"
    if not isinstance(value, dict):
        return None, f"the body is a JSON {type(value).__name__}, not an object with name and arguments"
    name, arguments = value.get("name"), value.get("arguments")
    if not isinstance(name, str) or not name:
        return None, 'no "name" (a non-empty string) in the call'
    if not isinstance(arguments, dict):
        return None, f'no "arguments" object in the call to {name!r}'
    return ToolCall(name, arguments), ""


def tool_result(name: str, content: Any) -> Message:
    """One tool result as a `tool` message whose content is `{"name": ..., "content": ...}` (the layout of
    Hermes' function-calling data); rendering wraps it in `<tool_response>`. `content` is any JSON value."""
    return Message("tool", json.dumps({"name": name, "content": content}, ensure_ascii=False))


def add_tool_results(messages: Sequence[Message], results: Sequence[tuple[str, Any]]) -> list[Message]:
    """The conversation with (name, content) tool results appended, one `tool` message each (consecutive
    results render as one tool turn).

    Raises:
        ValueError: `results` is empty.
    """
    if not results:
        raise ValueError("add_tool_results needs at least one (name, content) result")
    return [*messages, *(tool_result(name, content) for name, content in results)]


# Chat -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An assistant reply: its text (special tags as text), its tool calls and their problems, and whether it
    ended at a stop id (False: cut off at max_new_tokens)."""

    text: str
    calls: list[ToolCall]
    problems: list[str]
    finished: bool


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of `generate` (see there)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def reply_batch(
    model: Llama,
    chat: AnyChatFormat,
    conversations: Sequence[Sequence[Message]],
    tools: Sequence[dict[str, Any]] = (),
    sampling: Sampling = Sampling(),
) -> list[Reply]:
    """The next assistant reply of each conversation (all generated in one batch), in the Hermes format with
    `tools` offered in the system turn."""
    prompts = [chat.render_generation_prompt(messages, tools) for messages in conversations]
    outputs = generate(
        model,
        prompts,
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop_ids=chat.stop_ids,
        seed=sampling.seed,
        pad_id=chat.tokenizer.pad_id,
    )
    replies = []
    for ids in outputs:
        text = chat.tokenizer.decode(ids)
        calls, problems = parse_tool_calls(text)
        replies.append(Reply(text, calls, problems, finished=len(ids) < sampling.max_new_tokens))
    return replies


class ChatSession:
    """A conversation with a model: user messages and tool results in, assistant replies out.

    Args:
        model: the model.
        chat: its chat format.
        system: the system prompt ("" for none).
        tools: JSON schemas of the functions offered (listed in the system turn).
        sampling: decoding settings.

    Attributes:
        messages: the conversation so far (without the tool prompt, which rendering adds).
    """

    def __init__(
        self,
        model: Llama,
        chat: AnyChatFormat,
        system: str = "",
        tools: Sequence[dict[str, Any]] = (),
        sampling: Sampling = Sampling(),
    ) -> None:
        self.model = model
        self.chat = chat
        self.tools = list(tools)
        self.sampling = sampling
        self.messages: list[Message] = [Message("system", system)] if system else []

    def send(self, text: str) -> Reply:
        """Add a user message and return the assistant's reply (added to the conversation)."""
        self.messages.append(Message("user", text))
        return self._respond()

    def send_tool_results(self, results: Sequence[tuple[str, Any]]) -> Reply:
        """Add (function name, result) pairs as one tool turn and return the assistant's next reply."""
        self.messages = add_tool_results(self.messages, results)
        return self._respond()

    def _respond(self) -> Reply:
        (reply,) = reply_batch(self.model, self.chat, [self.messages], self.tools, self.sampling)
        self.messages.append(Message("assistant", reply.text))
        return reply
