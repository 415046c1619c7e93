"""Generate replies in the Hermes ChatML format: one-shot for a batch of prompts, or an interactive chat.

    python launch/generate.py --model DIR [--adapter DIR] [--system TEXT] [--tools FILE]
        [--prompt TEXT ...] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--device D] [--fp8]

--model is a training run directory (its newest checkpoint), or a Hugging Face / Meta checkpoint directory;
--adapter adds a PEFT LoRA adapter. With --prompt, each prompt is one user message and all replies are
generated in one batch, printed with their parsed tool calls. Without, it chats on stdin: when the model calls
tools, it asks for each call's result (a line of JSON or text) and feeds the results back as a tool turn.
Runs on CPU when there is no GPU. --fp8 generates with the FP8 simulation of the model (float8 block
projections, activations quantised per token: how its FP8 export is served); --model may also be an FP8
export.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hermes.cli import run_cli
from hermes.data.chat_files import check_vocabulary
from hermes.data.conversation import Message
from hermes.generate import ChatSession, Reply, Sampling, load_chat_format, load_model, reply_batch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to apply on top")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--tools", help="JSON file: a list of function schemas offered to the model")
    parser.add_argument("--prompt", action="append", help="a user message (repeat for a batch); none = chat")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed of sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--fp8", action="store_true", help="simulate FP8 inference (as the FP8 export serves)"
    )
    return parser.parse_args(argv)


def read_tools(path: str | None) -> list[dict[str, Any]]:
    """The function schemas of a --tools file: a JSON list of objects (or one object).

    Raises:
        ValueError: the file is not JSON, or not a list of objects (the file named).
    """
    if path is None:
        return []
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--tools {path}: cannot read a JSON list of function schemas ({err})") from err
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError(f"--tools {path}: expected a JSON list of function schemas (objects)")
    return tools


def show(reply: Reply, write: Callable[[str], None]) -> None:
    """Print a reply, then its tool calls and any tool-call problems."""
    write(reply.text if reply.finished else f"{reply.text} [cut off at --max-new-tokens]")
    for call in reply.calls:
        write(f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
    for problem in reply.problems:
        write(f"[tool call problem] {problem}")


def tool_result(text: str) -> Any:
    """A result typed by the user: JSON when it parses, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """Read user messages until end of input (or "/exit"); answer each, asking for tool results while the
    model calls tools."""
    while True:
        try:
            text = read("user> ")
        except EOFError:
            return
        if text.strip() == "/exit":
            return
        reply = session.send(text)
        show(reply, write)
        while reply.calls:
            try:
                results = [(call.name, tool_result(read(f"result of {call.name}> "))) for call in reply.calls]
            except EOFError:
                return
            reply = session.send_tool_results(results)
            show(reply, write)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tools = read_tools(args.tools)
    model = load_model(args.model, args.adapter, device=args.device, fp8=args.fp8)
    chat = load_chat_format(args.model)
    check_vocabulary(chat.tokenizer, model.config.vocab_size, str(args.model))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    system = [Message("system", args.system)] if args.system else []
    if args.prompt:
        conversations = [[*system, Message("user", prompt)] for prompt in args.prompt]
        for index, reply in enumerate(reply_batch(model, chat, conversations, tools, sampling), start=1):
            print(f"=== reply {index} ===")
            show(reply, print)
        return
    chat_loop(ChatSession(model, chat, args.system, tools, sampling), input, print)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
