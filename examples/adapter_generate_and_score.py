"""Load a Hugging Face checkpoint plus a PEFT LoRA adapter, chat with it, and score multiple-choice items.

    python examples/adapter_generate_and_score.py --model runs/tiny-sft/hf --adapter runs/tiny-dpo/adapter

Works with any Llama checkpoint directory hermes reads (Hugging Face or Meta layout) and any adapter in
PEFT's layout (hermes' own DPO output or one trained by peft).
"""

import argparse

from hermes.data import Message
from hermes.evaluate import Item, accuracy, score_item
from hermes.generate import generate, load_chat_format, load_model, parse_tool_calls

ITEMS = [
    Item(context="Question: What is 2 + 3?\nAnswer:", choices=(" 5", " 7", " 23"), answer=0),
    Item(context="Question: Reverse the word 'abc'.\nAnswer:", choices=(" cba", " abc"), answer=0),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="Hugging Face (or Meta) checkpoint directory")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory (optional)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model = load_model(args.model, adapter=args.adapter)  # the adapter is merged in: plain inference speed
    chat = load_chat_format(args.model)  # the checkpoint's tokenizer and Hermes tag ids, else Llama 3's
    questions = ["What is 6 * 7?", "What's the weather in Paris?"]
    prompts = [chat.render_generation_prompt([Message("user", q)]) for q in questions]
    replies = generate(
        model, prompts, args.max_new_tokens, stop_ids=chat.stop_ids, pad_id=chat.tokenizer.pad_id
    )
    for question, reply in zip(questions, replies):
        text = chat.tokenizer.decode(reply)
        calls, problems = parse_tool_calls(text)
        print(f"user: {question}\nassistant: {text!r}\ntool calls: {calls} problems: {problems}")

    scores = [score_item(model, chat.tokenizer, item) for item in ITEMS]
    print("multiple choice:", accuracy(scores))


if __name__ == "__main__":
    main()
