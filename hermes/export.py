"""Convert an exported model directory to other serving formats.

    python -m hermes.export gguf RUN_DIR/hf OUT.gguf [--type f16|bf16|q8_0]
    python -m hermes.export fp8 RUN_DIR/hf OUT_DIR

`gguf` writes one llama.cpp file (weights, tokenizer, chat template; see hermes.model.gguf). `fp8` writes a
compressed-tensors FP8_DYNAMIC directory that vLLM serves (see hermes.parallel.sharded_fp8). Each format is
a subcommand: `add_parser` functions register them, each with its own handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_gguf(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "gguf",
        help="one llama.cpp GGUF file from a Hugging Face Llama directory",
        description="Write a Hugging Face Llama directory (config.json, safetensors, tokenizer.json, "
        "tokenizer_config.json) as one llama.cpp GGUF file with its tokenizer and chat template.",
    )
    parser.add_argument("source", help="the Hugging Face directory, e.g. runs/tiny-sft/hf")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument(
        "--type",
        default="f16",
        choices=("f16", "bf16", "q8_0"),
        help="how matrices are stored (norms stay float32); default f16",
    )
    parser.set_defaults(handler=_run_gguf)


def _run_gguf(args: argparse.Namespace) -> str:
    from hermes.model.gguf import export_gguf  # needs the optional gguf package

    path = export_gguf(args.source, args.output, args.type)
    return f"Wrote {path} ({args.type})"


def _add_fp8(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fp8",
        help="an FP8 (compressed-tensors FP8_DYNAMIC) directory from a Hugging Face Llama directory",
        description="Write a Hugging Face Llama directory as llm-compressor's FP8_DYNAMIC checkpoint: block "
        "projections in float8_e4m3fn with one scale per output channel, embedding, norms and head as they "
        "are, with the source's tokenizer files and chat template; vLLM serves it as it is.",
    )
    parser.add_argument("source", help="the Hugging Face directory, e.g. runs/tiny-sft/hf")
    parser.add_argument("output", help="the directory to write")
    parser.set_defaults(handler=_run_fp8)


def _run_fp8(args: argparse.Namespace) -> str:
    from hermes.parallel.sharded_fp8 import export_fp8_directory  # needs the optional compressed-tensors

    return f"Wrote {export_fp8_directory(args.source, args.output)} (FP8_DYNAMIC, compressed-tensors)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one export subcommand.

    Args:
        argv: the command line after the program name; None reads sys.argv.

    Returns:
        The exit status: 0, or 1 after printing the error (a missing file, a model or tokenizer the
        format cannot take, a missing optional package).
    """
    parser = argparse.ArgumentParser(prog="python -m hermes.export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    _add_gguf(commands)
    _add_fp8(commands)
    args = parser.parse_args(argv)
    try:
        print(args.handler(args))
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
