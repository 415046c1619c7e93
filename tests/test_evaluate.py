import json
import math

import pytest
import torch

from hermes.data.tokenizer import Tokenizer
from hermes.evaluate import Item, accuracy, main, read_items, score_item
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained

SMALL = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128)
REAL_VOCAB = LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32)


class ByteTokenizer:
    """Text as its UTF-8 bytes, BOS = 0: token boundaries are obvious, so expected scores can be worked out."""

    bos_id = 0

    def encode(self, text, *, bos=False):
        return [self.bos_id] * bos + list(text.encode())


def _random_model() -> Llama:
    torch.manual_seed(0)
    return Llama(SMALL).eval()


@torch.no_grad()
def _constant_model(config: LlamaConfig, bias: torch.Tensor) -> Llama:
    """A model whose next-token logits are bias / sqrt(1 + eps) whatever the context: every embedding is the
    ones vector, the blocks add nothing (zero output projections), RMSNorm maps ones to 1 / sqrt(1 + eps), and
    the head reads that into column 0, which holds `bias`."""
    model = Llama(config).eval()
    model.tok_embeddings.weight.fill_(1.0)
    for layer in model.layers:
        layer.attention.wo.weight.zero_()
        layer.feed_forward.w2.weight.zero_()
    model.output.weight.zero_()
    model.output.weight[:, 0] = bias
    return model


def _constant_logprobs(bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    logits = bias.double() / math.sqrt(1 + eps)
    return logits - torch.logsumexp(logits, 0)


@torch.no_grad()
def test_choice_scores_match_a_naive_forward_per_choice():
    model, tokenizer = _random_model(), ByteTokenizer()
    item = Item("The sky is", (" blue", " green and wide", " x"), 0)
    score = score_item(model, tokenizer, item)
    for choice, got in zip(item.choices, score.logprobs):
        context = tokenizer.encode(item.context, bos=True)
        ids = tokenizer.encode(item.context + choice, bos=True)
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
        expected = sum(float(logprobs[t, ids[t + 1]]) for t in range(len(context) - 1, len(ids) - 1))
        assert got == pytest.approx(expected, abs=1e-4)
    assert score.normalized == pytest.approx([lp / len(c) for lp, c in zip(score.logprobs, item.choices)])


def test_sum_and_per_character_scores_pick_as_worked_by_hand():
    bias = torch.zeros(256)
    bias[ord("a")] = 8.0  # "a" is likely, every other byte is not
    model = _constant_model(SMALL, bias)
    logp = _constant_logprobs(bias)
    a, other = float(logp[ord("a")]), float(logp[ord("b")])
    items = [
        Item("Q:", (" b", " aaaa"), 1),  # both ways " aaaa" wins
        Item("Q:", ("b", "aaaaaaaaab"), 1),  # the sum prefers the short "b", per character the long one
        Item("Q: ", ("a", "b"), 0),  # the context's trailing space is scored as part of each choice
    ]
    scores = [score_item(model, ByteTokenizer(), item) for item in items]
    assert scores[0].logprobs == pytest.approx([2 * other, other + 4 * a], abs=1e-4)
    assert scores[1].logprobs == pytest.approx([other, 9 * a + other], abs=1e-4)
    assert scores[1].normalized == pytest.approx([other, (9 * a + other) / 10], abs=1e-4)
    assert scores[2].logprobs == pytest.approx([other + a, 2 * other], abs=1e-4)
    assert scores[2].normalized == pytest.approx([other + a, 2 * other], abs=1e-4)  # divided by len("a")
    assert [s.predicted for s in scores] == [1, 0, 0]
    assert [s.predicted_norm for s in scores] == [1, 1, 0]
    assert accuracy(scores) == {"acc": pytest.approx(2 / 3), "acc_norm": 1.0}


def test_command_line_reports_accuracy_of_a_saved_model(tmp_path, capsys):
    tokenizer = Tokenizer.default()
    (yes,), (no,), (dog,), (cat,) = (tokenizer.encode(w) for w in (" yes", " no", " dog", " cat"))
    bias = torch.zeros(REAL_VOCAB.vocab_size)
    bias[[yes, cat]] = 10.0
    save_pretrained(_constant_model(REAL_VOCAB, bias), tmp_path / "model")
    items = tmp_path / "items.jsonl"
    lines = [
        {"context": "Is it?", "choices": [" yes", " no"], "answer": 0},
        {"context": "Pet:", "choices": [" dog", " cat"], "answer": 1},
        {"context": "Is it not?", "choices": [" no", " yes"], "answer": 0},  # the model picks " yes": wrong
    ]
    items.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    main(["--model", str(tmp_path / "model"), str(items), "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 3
    assert report["acc"] == pytest.approx(2 / 3) and report["acc_norm"] == pytest.approx(2 / 3)
    logp = _constant_logprobs(bias)
    assert report["scores"][0]["logprobs"] == pytest.approx([float(logp[yes]), float(logp[no])], abs=1e-4)
    assert report["scores"][1]["logprobs"] == pytest.approx([float(logp[dog]), float(logp[cat])], abs=1e-4)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"context": "a", "choices": ["b"], "answer": 0', r"items.jsonl:2: not valid JSON"),
        (
            '{"context": "a", "choices": ["b", "c"], "answer": 2}',
            r"items.jsonl:2: \"answer\" must be .* \[0, 1\]",
        ),
        (
            '{"context": "a", "choices": [], "answer": 0}',
            r"items.jsonl:2: \"choices\" must be a non-empty list",
        ),
        (
            '{"context": "a", "choices": ["b", " "], "answer": 0}',
            r"items.jsonl:2: every choice must be a non-blank",
        ),
        ('{"choices": ["b"], "answer": 0}', r"items.jsonl:2: \"context\" must be a string"),
        ('["a", ["b"], 0]', r"items.jsonl:2: the line is a JSON list, not an object"),
    ],
)
def test_bad_items_are_named_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "ok", "choices": [" fine"], "answer": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_items(path)
