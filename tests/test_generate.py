import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hermes.data.chat import ChatFormat
from hermes.data.conversation import Message
from hermes.data.tokenizer import Tokenizer
from hermes.generate import (
    ChatSession,
    Reply,
    Sampling,
    ToolCall,
    add_tool_results,
    generate,
    load_model,
    parse_tool_calls,
    sample_next,
)
from hermes.model import Llama, LlamaConfig
from hermes.model.attention import cache_attention_mask
from hermes.model.hf import save_pretrained
from hermes.model.lora import apply_lora, save_adapter
from hermes.parallel.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parent.parent
SMALL = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128)
# The real vocabulary (for the chat format's token ids) on a minimal body.
REAL_VOCAB = LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=4096)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [8, 1], [200, 13, 77, 91]]


def _model(config: LlamaConfig = SMALL, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(config).eval()


@torch.no_grad()
def _naive_greedy(model, prompt, steps, stop_ids=()):
    """Re-run the full forward over the whole sequence at every step and take the argmax."""
    sequence = list(prompt)
    for _ in range(steps):
        token = int(model(torch.tensor([sequence]))[0, -1].argmax())
        if token in stop_ids:
            break
        sequence.append(token)
    return sequence[len(prompt) :]


@torch.no_grad()
def _logits(model, tokens):
    return model(torch.tensor([tokens]))[0]


# KV cache ---------------------------------------------------------------------------------------------------


def test_cached_greedy_generation_of_one_prompt_equals_full_recompute():
    model = _model()
    assert generate(model, [PROMPTS[0]], 12) == [_naive_greedy(model, PROMPTS[0], 12)]


def test_cached_greedy_generation_of_a_left_padded_batch_equals_each_prompt_alone():
    model = _model()
    expected = [_naive_greedy(model, prompt, 10) for prompt in PROMPTS]
    assert generate(model, PROMPTS, 10) == expected


@torch.no_grad()
def test_cached_logits_at_every_step_equal_the_full_forward_last_position():
    model = _model()
    longest = max(map(len, PROMPTS))
    padding = [longest - len(p) for p in PROMPTS]
    cache = model.new_cache(len(PROMPTS), longest + 4, padding=padding)
    padded = torch.tensor([[0] * pad + p for pad, p in zip(padding, PROMPTS)])
    prefill = model(padded, cache=cache)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(prefill[row, -1], _logits(model, prompt)[-1], atol=1e-5, rtol=1e-5)
    sequences = [list(p) for p in PROMPTS]
    for step in range(4):
        new = [(31 * step + 7 * row) % SMALL.vocab_size for row in range(len(PROMPTS))]
        for sequence, token in zip(sequences, new):
            sequence.append(token)
        logits = model(torch.tensor(new)[:, None], cache=cache)
        assert cache.length == longest + step + 1
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row, -1], _logits(model, sequence)[-1], atol=1e-5, rtol=1e-5)


def test_cache_mask_is_causal_from_the_offset_and_hides_left_padding():
    padding = torch.tensor([2, 0])
    T, F = True, False
    prefill = cache_attention_mask(padding, start=0, seq=3)
    assert prefill.shape == (2, 1, 3, 3)
    # Row 0: positions 0 and 1 are padding (each sees only itself); position 2 sees only itself, the first
    # real token. Row 1: plain causal.
    assert prefill[0, 0].tolist() == [[T, F, F], [F, T, F], [F, F, T]]
    assert prefill[1, 0].tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    step = cache_attention_mask(padding, start=3, seq=1)
    assert step[:, 0].tolist() == [[[F, F, T, T]], [[T, T, T, T]]]


def test_a_cache_too_small_for_the_new_positions_is_refused():
    model = _model()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match=r"holds 4 positions and 0 are used; 5 more do not fit"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# Sampling and stopping --------------------------------------------------------------------------------------


def test_seeded_sampling_repeats_and_another_seed_differs():
    model = _model()
    first = generate(model, PROMPTS, 16, temperature=1.0, seed=3)
    assert generate(model, PROMPTS, 16, temperature=1.0, seed=3) == first
    assert generate(model, PROMPTS, 16, temperature=1.0, seed=4) != first
    assert first != generate(model, PROMPTS, 16)  # it samples: not the greedy path


def test_tiny_top_p_keeps_only_the_most_likely_token_so_it_equals_greedy():
    model = _model()
    assert generate(model, PROMPTS, 10, temperature=1.5, top_p=1e-6, seed=0) == generate(model, PROMPTS, 10)


def test_top_p_samples_only_from_the_nucleus_in_proportion():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 (mass 0.8 >= 0.7), then cut
    logits = probs.log().expand(40000, 4)
    drawn = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts[[1, 3]], torch.tensor([0.5 / 0.8, 0.3 / 0.8]), atol=0.01, rtol=0)


def test_temperature_sharpens_the_sampled_distribution():
    logits = torch.tensor([0.0, 1.0]).expand(40000, 2)
    drawn = sample_next(logits, 0.5, 1.0, torch.Generator().manual_seed(0)).float().mean()
    expected = torch.softmax(torch.tensor([0.0, 2.0]), 0)[1]  # softmax(logits / 0.5)
    assert abs(float(drawn) - float(expected)) < 0.01


def test_a_stop_id_ends_only_its_own_sequence_and_is_not_returned():
    model = _model()
    free = [_naive_greedy(model, prompt, 8) for prompt in PROMPTS]
    # The fourth token of row 2, which row 2 does not emit before and row 0 never emits.
    stop = free[2][3]
    assert stop not in free[2][:3] and stop not in free[0]
    out = generate(model, PROMPTS, 8, stop_ids=[stop])
    assert out[2] == free[2][:3]
    assert out[0] == free[0]
    assert out[1] == _naive_greedy(model, PROMPTS[1], 8, stop_ids=[stop])


def test_bad_generation_settings_are_named():
    model = _model()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match=r"top_p in \(0, 1\] \(got 0\)"):
        generate(model, [[1]], 4, top_p=0)


def test_generation_leaves_a_training_model_in_training_mode():
    model = _model().train()
    generate(model, [[1, 2]], 2)
    assert model.training


# Tool calls -------------------------------------------------------------------------------------------------


def test_valid_tool_calls_are_parsed_in_order():
    text = (
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Seoul", "utc": false}}\n</tool_call>'
    )
    calls, problems = parse_tool_calls(text)
    assert problems == []
    assert calls == [
        ToolCall("get_weather", {"city": "Oslo"}),
        ToolCall("get_time", {"city": "Seoul", "utc": False}),
    ]


def test_a_reply_without_tool_calls_has_no_calls_and_no_problems():
    assert parse_tool_calls("It is 13:04 in Tokyo.") == ([], [])


def test_malformed_json_is_reported_and_the_other_calls_kept():
    text = (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>\n'  # one brace short
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    )
    calls, problems = parse_tool_calls(text)
    assert calls == [ToolCall("b", {})]
    assert len(problems) == 1 and "tool call at character 0: not valid JSON" in problems[0]


def test_an_unclosed_tag_is_reported():
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\nand <tool_call>\n{"name": "b"'
    calls, problems = parse_tool_calls(text)
    start = text.rindex("<tool_call>")
    assert calls == [ToolCall("a", {})]
    assert problems == [f"<tool_call> at character {start} is never closed (no </tool_call>)"]


def test_a_call_opened_inside_an_open_call_and_a_stray_close_are_reported():
    text = '<tool_call>\n{"name": "a"\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call></tool_call>'
    calls, problems = parse_tool_calls(text)
    assert calls == [ToolCall("b", {})]
    assert "<tool_call> at character 0 is not closed before the next one opens" in problems[0]
    assert problems[1].startswith("</tool_call> at character") and "closes no <tool_call>" in problems[1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"arguments": {"city": "Oslo"}}', 'no "name"'),
        ('{"name": "", "arguments": {}}', 'no "name"'),
        ('{"name": "get_weather"}', "no \"arguments\" object in the call to 'get_weather'"),
        ('{"name": "get_weather", "arguments": "city=Oslo"}', 'no "arguments" object'),
        ('["get_weather"]', "JSON list, not an object"),
    ],
)
def test_a_call_missing_its_name_or_arguments_is_reported(body, message):
    calls, problems = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")
    assert calls == [] and len(problems) == 1 and message in problems[0]


def test_tool_results_become_tool_messages_that_render_as_one_tool_turn():
    chat = ChatFormat(Tokenizer.default())
    messages = [Message("user", "Time in Tokyo and weather in Oslo?"), Message("assistant", "<tool_call>...")]
    first = add_tool_results(messages, [("get_time", {"time": "13:04"})])
    both = add_tool_results(first, [("get_weather", "rainy")])
    assert both[:2] == messages
    assert both[2:] == [
        Message("tool", '{"name": "get_time", "content": {"time": "13:04"}}'),
        Message("tool", '{"name": "get_weather", "content": "rainy"}'),
    ]
    assert add_tool_results(messages, [("get_time", {"time": "13:04"}), ("get_weather", "rainy")]) == both
    text = chat.tokenizer.decode(chat.render_generation_prompt(both))
    assert text.endswith(
        '<|im_start|>tool\n<tool_response>\n{"name": "get_time", "content": {"time": "13:04"}}\n</tool_response>\n'
        '<tool_response>\n{"name": "get_weather", "content": "rainy"}\n</tool_response><|im_end|>'
        "<|im_start|>assistant\n"
    )


# Loading ----------------------------------------------------------------------------------------------------


def _tokens():
    return torch.tensor([PROMPTS[0]])


@torch.no_grad()
def test_model_loads_from_a_hugging_face_directory_with_a_peft_adapter(tmp_path):
    base = _model()
    save_pretrained(base, tmp_path / "hf")
    adapted = _model()
    apply_lora(adapted, rank=4, alpha=8.0, dropout=0.0, targets=("all-linear",))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.copy_(0.05 * torch.randn_like(param))
    save_adapter(adapted, tmp_path / "adapter")
    plain = load_model(tmp_path / "hf")
    torch.testing.assert_close(plain(_tokens()), base(_tokens()))
    merged = load_model(tmp_path / "hf", tmp_path / "adapter")
    torch.testing.assert_close(merged(_tokens()), adapted.eval()(_tokens()), atol=1e-5, rtol=1e-5)
    assert not merged.training and not any(p.requires_grad for p in merged.parameters())


def _write_run(run_dir: Path, base_dir: Path, model: torch.nn.Module, trainable_only: bool) -> None:
    """A run directory as training leaves it: config.toml naming the base, a DCP checkpoint of `model`."""
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(
        f'[model]\ncheckpoint = "{base_dir}"\n\n[lora]\nrank = 4\nalpha = 8.0\n'
    )
    store = torch.distributed.FileStore(str(run_dir / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        Checkpointer(run_dir / "checkpoints", model, optimizer, {}, trainable_only=trainable_only).save(3)
    finally:
        torch.distributed.destroy_process_group()


@torch.no_grad()
def test_run_directory_loads_its_newest_checkpoint_not_its_base(tmp_path):
    save_pretrained(_model(seed=0), tmp_path / "base")
    trained = _model(seed=1)  # stands for the weights training reached
    _write_run(tmp_path / "run", tmp_path / "base", trained, trainable_only=False)
    loaded = load_model(tmp_path / "run")
    torch.testing.assert_close(loaded(_tokens()), trained(_tokens()))


@torch.no_grad()
def test_lora_run_directory_loads_the_base_plus_its_checkpointed_adapter(tmp_path):
    save_pretrained(_model(seed=0), tmp_path / "base")
    adapted = _model(seed=0)
    apply_lora(adapted, rank=4, alpha=8.0, dropout=0.0, targets=("all-linear",))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.copy_(0.05 * torch.randn_like(param))
    _write_run(tmp_path / "run", tmp_path / "base", adapted, trainable_only=True)
    loaded = load_model(tmp_path / "run")
    torch.testing.assert_close(loaded(_tokens()), adapted.eval()(_tokens()), atol=1e-5, rtol=1e-5)


def test_run_directory_without_a_complete_checkpoint_is_named(tmp_path):
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(FileNotFoundError, match=r"has no complete checkpoint under checkpoints/"):
        load_model(tmp_path)


# Chat and the launch script ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-hf")
    model = _model(REAL_VOCAB)
    save_pretrained(model, directory)
    return model, directory


def test_chat_session_renders_the_whole_conversation_with_tools_and_results(real_vocab_model):
    model, _ = real_vocab_model
    chat = ChatFormat(Tokenizer.default())
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    session = ChatSession(model, chat, "Be brief.", tools, Sampling(max_new_tokens=3))
    first = session.send("Time in Tokyo?")
    second = session.send_tool_results([("get_time", {"time": "13:04"})])
    roles = [m.role for m in session.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert session.messages[2].content == first.text and session.messages[4].content == second.text
    # The second reply continued the conversation as rendered up to the tool turn.
    prompt = chat.render_generation_prompt(session.messages[:4], tools)
    expected = chat.tokenizer.decode(_naive_greedy(model, prompt, 3, chat.stop_ids))
    assert second.text == expected
    assert "<tool_response>" in chat.tokenizer.decode(prompt) and "<tools>" in chat.tokenizer.decode(prompt)


def test_launch_script_one_shot_prints_each_reply_of_a_batch(real_vocab_model):
    model, directory = real_vocab_model
    prompts = ["Hello!", "What is the capital of France?"]
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "generate.py"), "--model", str(directory),
         "--system", "You are terse.", "--max-new-tokens", "4",
         "--prompt", prompts[0], "--prompt", prompts[1]],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    chat = ChatFormat(Tokenizer.default())
    expected = []
    for index, prompt in enumerate(prompts, start=1):
        ids = chat.render_generation_prompt([Message("system", "You are terse."), Message("user", prompt)])
        reply = _naive_greedy(model, ids, 4, chat.stop_ids)
        text = chat.tokenizer.decode(reply)
        expected += [
            f"=== reply {index} ===",
            text if len(reply) < 4 else f"{text} [cut off at --max-new-tokens]",
        ]
    assert result.stdout.startswith("\n".join(expected) + "\n")


def test_launch_script_names_a_bad_tools_file(tmp_path):
    launch = runpy.run_path(str(REPO / "launch" / "generate.py"), run_name="launch_generate")
    broken, not_a_list = tmp_path / "broken.json", tmp_path / "strings.json"
    broken.write_text('[{"type": "function"')
    not_a_list.write_text('["get_time"]')
    with pytest.raises(ValueError, match=f"--tools {broken}: cannot read a JSON list of function schemas"):
        launch["main"](["--model", str(tmp_path), "--tools", str(broken)])
    with pytest.raises(ValueError, match=f"--tools {not_a_list}: expected a JSON list of function schemas"):
        launch["main"](["--model", str(tmp_path), "--tools", str(not_a_list)])


def test_chat_loop_asks_for_each_tool_result_and_feeds_them_back_as_one_turn():
    launch = runpy.run_path(str(REPO / "launch" / "generate.py"), run_name="launch_generate")
    calls = [ToolCall("get_time", {"city": "Tokyo"}), ToolCall("get_weather", {"city": "Oslo"})]
    replies = iter([Reply("<tool_call>...", calls, [], True), Reply("13:04, rainy.", [], [], True)])
    sent = []

    class Session:
        def send(self, text):
            sent.append(("user", text))
            return next(replies)

        def send_tool_results(self, results):
            sent.append(("tool", results))
            return next(replies)

    lines = iter(["Time in Tokyo, weather in Oslo?", '{"time": "13:04"}', "rainy"])
    asked, shown = [], []

    def read(prompt):
        asked.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    launch["chat_loop"](Session(), read, shown.append)
    assert sent == [
        ("user", "Time in Tokyo, weather in Oslo?"),
        ("tool", [("get_time", {"time": "13:04"}), ("get_weather", "rainy")]),
    ]
    assert asked == ["user> ", "result of get_time> ", "result of get_weather> ", "user> "]
    assert shown[1:3] == [
        '[tool call] get_time({"city": "Tokyo"})',
        '[tool call] get_weather({"city": "Oslo"})',
    ]
    assert shown[-1] == "13:04, rainy."
