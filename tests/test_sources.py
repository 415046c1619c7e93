import dataclasses
import filecmp
import gzip
import json
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from hermes.config import DataConfig
from hermes.data import pipeline, workers
from hermes.data.chat import ChatFormat
from hermes.data.dataset import TokenizedDataset
from hermes.data.pipeline import bundled_example, prepare_preference_dataset, prepare_sft_dataset
from hermes.data.records import RecordError, read_conversations
from hermes.data.sources import data_files
from hermes.data.template_chat import TemplateChatFormat
from hermes.data.tokenizer import Tokenizer
from tests.test_template_chat import LLAMA31_STYLE

datasets.disable_progress_bars()

ACCEPTED = re.escape("JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet) or Arrow (.arrow)")

WEATHER = {
    "name": "get_weather",
    "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CURRENCY = {
    "name": "convert_currency",
    "description": "Convert money.",
    "parameters": {
        "type": "object",
        "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
    },
}


def _call(name: str, arguments: dict) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CALLS = [
    # No category, an assistant turn that is only a call (content null), the others without tool_calls:
    # written to Parquet, every other turn of the file gets tool_calls: null, and this row category: null.
    {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "Oslo"})]},
            {"role": "tool", "content": '{"temperature": -3}'},
            {"role": "assistant", "content": "It is -3 C in Oslo."},
        ],
        "tools": [WEATHER],
    },
    {
        "messages": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "100 USD in EUR?"},
            {
                "role": "assistant",
                "content": "Let me convert it.",
                "tool_calls": [_call("convert_currency", {"amount": 100, "from": "USD", "to": "EUR"})],
            },
            {"role": "tool", "content": '{"result": 92}'},
            {"role": "assistant", "content": "100 USD is 92 EUR."},
        ],
        "tools": [WEATHER, CURRENCY],
        "category": "tool_use",
    },
]


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.default())


def bundled_records(name: str) -> list[dict]:
    return [json.loads(line) for line in bundled_example(name).read_text().splitlines()]


SFT_RECORDS = bundled_records("sft.jsonl") + TOOL_CALLS
"""The bundled mixture (ShareGPT and OpenAI records, tools, records the filters drop) and tool calls."""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        path.write_bytes(text)
    return path


def arrow_table(records: list[dict]) -> pa.Table:
    """One Arrow schema for all records, as a dataset converted to Parquet has: the union of their keys."""
    return pa.Table.from_struct_array(pa.array(records))


def write_parquet(path: Path, records: list[dict], **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow_table(records), path, **options)
    return path


def dataset(records: list[dict]) -> datasets.Dataset:
    """A `datasets.Dataset` of the records, every row given every column (null where it has none)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return datasets.Dataset.from_list([{key: record.get(key) for key in columns} for record in records])


def save_dataset(path: Path, records: list[dict]) -> Path:
    dataset(records).save_to_disk(str(path))
    return path


def write_repository(path: Path, records: list[dict]) -> Path:
    """A dataset repository: the train split in two Parquet files, a test split, a README and git files."""
    half = len(records) // 2
    write_parquet(path / "data" / "train-00000-of-00002.parquet", records[:half])
    write_parquet(path / "data" / "train-00001-of-00002.parquet", records[half:])
    write_parquet(path / "data" / "test-00000-of-00001.parquet", records[:3])
    write_parquet(path / ".git" / "lfs" / "objects.parquet", records[:3])
    (path / "README.md").write_text("# a dataset\n")
    return path


WRITERS = {
    "jsonl.gz": lambda tmp, records: write_jsonl(tmp / "data.jsonl.gz", records),
    "jsonl.zst": lambda tmp, records: write_jsonl(tmp / "data.jsonl.zst", records),
    "parquet": lambda tmp, records: write_parquet(tmp / "data.parquet", records, row_group_size=700),
    "saved dataset": lambda tmp, records: save_dataset(tmp / "saved", records),
    "repository": lambda tmp, records: write_repository(tmp / "repo", records),
}


def record_index(source: str) -> int:
    """The 0-based record index a source names: "path:line" (1-based, no blank lines) or "path:row N"."""
    where = source.rsplit(":", 1)[1]
    return int(where.removeprefix("row ")) if where.startswith("row ") else int(where) - 1


def counts(directory: Path) -> dict:
    """filter_summary.json with each example source replaced by the index of its record."""
    summary = json.loads((directory / "filter_summary.json").read_text())
    for stage in summary.values():
        stage["examples"] = {r: [record_index(s) for s in e] for r, e in stage["examples"].items()}
        if "truncated_examples" in stage:
            stage["truncated_examples"] = [record_index(s) for s in stage["truncated_examples"]]
    return summary


def contents(directory: Path) -> dict:
    dataset = TokenizedDataset.load(directory)
    return {
        "tokens": dataset.tokens.tolist(),
        "labels": dataset.labels.tolist(),
        "offsets": dataset.offsets.tolist(),
        "categories": dataset.categories,
    }


def prepare(chat, kind: str, data: Path | list[Path], cache: Path, **options) -> Path:
    prepare_dataset = prepare_sft_dataset if kind == "sft" else prepare_preference_dataset
    train = [str(path) for path in (data if isinstance(data, list) else [data])]
    return prepare_dataset(chat, DataConfig(train=train, workers=1, **options), 0, cache)


# --- every format gives the same samples --------------------------------------------------------------


@pytest.mark.parametrize("form", WRITERS)
def test_every_form_of_the_data_gives_the_samples_and_filter_counts_of_its_jsonl(chat, tmp_path, form):
    options = {"seq_len": 256, "min_tokens": 20}  # some records truncated, some dropped as too short
    reference = prepare(
        chat, "sft", write_jsonl(tmp_path / "data.jsonl", SFT_RECORDS), tmp_path / "a", **options
    )
    data = WRITERS[form](tmp_path, SFT_RECORDS)
    directory = prepare(chat, "sft", data, tmp_path / "b", **options)
    assert contents(directory) == contents(reference)
    assert counts(directory) == counts(reference)
    summary = counts(reference)
    assert summary["records"]["dropped"] and summary["seq_len"]["truncated"] and summary["samples"]["dropped"]


@pytest.mark.parametrize("form", ["parquet", "saved dataset"])
def test_preference_pairs_from_parquet_and_a_saved_dataset_equal_their_jsonl(chat, tmp_path, form):
    # One file per record form (a Parquet column holds one type): turn lists, then plain strings.
    records = bundled_records("preference.jsonl")
    forms = [[r for r in records if "messages" in r], [r for r in records if "prompt" in r]]
    jsonl = [write_jsonl(tmp_path / f"pairs-{i}.jsonl", part) for i, part in enumerate(forms)]
    data = [WRITERS[form](tmp_path / f"part-{i}", part) for i, part in enumerate(forms)]
    reference = prepare(chat, "preference", jsonl, tmp_path / "a", seq_len=128)
    directory = prepare(chat, "preference", data, tmp_path / "b", seq_len=128)
    assert contents(directory) == contents(reference)
    assert counts(directory) == counts(reference)
    assert counts(reference)["pairs"]["dropped"] == {"pair_longer_than_seq_len": 218}


def without_source(conversations) -> list:
    return [dataclasses.replace(c, source="") for c in conversations]


def test_null_struct_fields_of_a_parquet_row_read_as_absent_keys(tmp_path):
    parquet = write_parquet(tmp_path / "calls.parquet", SFT_RECORDS[-50:])
    schema = pq.read_schema(parquet)
    message = schema.field("messages").type.value_type
    assert message.get_field_index("tool_calls") >= 0 and schema.get_field_index("conversations") >= 0
    rows = pq.read_table(parquet).to_pylist()
    assert rows[-2]["category"] is None and rows[-2]["messages"][0]["tool_calls"] is None
    expected = without_source(read_conversations(write_jsonl(tmp_path / "calls.jsonl", SFT_RECORDS[-50:])))
    assert without_source(read_conversations(parquet)) == expected
    assert expected[-2].category == "" and expected[-2].messages[1].content.startswith("<tool_call>")


def test_tools_given_as_a_json_string_column_read_as_the_list(tmp_path):
    records = [{**record, "tools": json.dumps(record["tools"])} for record in TOOL_CALLS]
    parquet = write_parquet(tmp_path / "tools.parquet", records)
    assert pq.read_schema(parquet).field("tools").type == pa.string()
    expected = without_source(read_conversations(write_jsonl(tmp_path / "tools.jsonl", TOOL_CALLS)))
    assert without_source(read_conversations(parquet)) == expected


# --- where the files are -------------------------------------------------------------------------------


def test_a_repository_directory_reads_its_train_split_files_in_order(tmp_path):
    repository = write_repository(tmp_path / "repo", SFT_RECORDS[:10])
    assert data_files([repository]) == [
        repository / "data" / "train-00000-of-00002.parquet",
        repository / "data" / "train-00001-of-00002.parquet",
    ]
    flat = tmp_path / "flat"
    write_parquet(flat / "b.parquet", SFT_RECORDS[:2])
    write_jsonl(flat / "a.jsonl.gz", SFT_RECORDS[:2])
    assert data_files([flat]) == [flat / "a.jsonl.gz", flat / "b.parquet"]  # no split named: every file


def test_a_saved_dataset_dict_reads_its_train_split(tmp_path):
    splits = datasets.DatasetDict(train=dataset(TOOL_CALLS), test=dataset(TOOL_CALLS[:1]))
    splits.save_to_disk(str(tmp_path / "splits"))
    (train,) = data_files([tmp_path / "splits"])
    assert train.parent == tmp_path / "splits" / "train" and train.suffix == ".arrow"
    conversations = list(read_conversations(tmp_path / "splits"))
    assert without_source(conversations) == without_source(
        read_conversations(write_jsonl(tmp_path / "t.jsonl", TOOL_CALLS))
    )
    assert conversations[1].source == f"{train}:row 1"


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_a_parquet_row_with_an_unknown_role_names_the_file_and_the_row(
    chat, tmp_path, monkeypatch, processes
):
    monkeypatch.setattr(pipeline, "CHUNK_RECORDS", 2)  # 21 shards: with 2 processes, the error is a worker's
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep."}]}
    records = [*SFT_RECORDS[:33], bad, *SFT_RECORDS[33:41]]
    parquet = write_parquet(tmp_path / "bad.parquet", records)
    expected = f"{parquet}:row 33: field 'messages[1].role': unknown role 'robot'. Fix: use one of system"
    config = DataConfig(train=[str(parquet)], workers=processes)
    with pytest.raises(RecordError, match=re.escape(expected)):
        prepare_sft_dataset(chat, config, 0, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the partial cache is removed


def test_a_missing_path_names_the_accepted_forms(chat, tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(missing))} not found; set data.train to {ACCEPTED}"
    ):
        prepare(chat, "sft", missing, tmp_path / "cache")


def test_an_unknown_extension_names_the_accepted_forms(chat, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("messages\n")
    with pytest.raises(
        ValueError, match=f"{re.escape(str(csv))}: unknown file type; data.train accepts {ACCEPTED}"
    ):
        prepare(chat, "sft", csv, tmp_path / "cache")


def test_a_directory_without_data_files_names_the_accepted_forms(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing to train on")
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(tmp_path))} holds no data file; .*{ACCEPTED}"
    ):
        data_files([tmp_path])


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl.zst"])
def test_a_damaged_compressed_file_names_the_file(tmp_path, name):
    data = write_jsonl(
        tmp_path / name, [{"messages": [{"role": "user", "content": str(i)}]} for i in range(3000)]
    )
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{data}: cannot be read after line")):
        list(read_conversations(data))


@pytest.mark.parametrize(("module", "name"), [("pyarrow", "data.parquet"), ("zstandard", "data.jsonl.zst")])
def test_a_format_whose_reader_is_not_installed_names_the_data_extra(tmp_path, monkeypatch, module, name):
    data = (write_parquet if name.endswith(".parquet") else write_jsonl)(tmp_path / name, TOOL_CALLS)
    for loaded in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.setitem(sys.modules, loaded, None)  # import fails as if not installed
    with pytest.raises(
        ImportError,
        match=re.escape(f"reading {data} needs {module}; install it with pip install -e '.[data]'"),
    ):
        list(read_conversations(data))


# --- parallel and bounded ------------------------------------------------------------------------------


def test_a_chat_format_rebuilt_from_its_pickled_recipe_renders_the_same(chat):
    template = TemplateChatFormat(chat.tokenizer, LLAMA31_STYLE, template_source="test")
    conversations = list(read_conversations(bundled_example("sft.jsonl")))[:200]
    for original in (chat, ChatFormat(Tokenizer.default(), default_system_prompt=""), template):
        rebuilt = pickle.loads(pickle.dumps(pipeline.portable_chat(original)))()
        assert type(rebuilt) is type(original)
        assert [rebuilt.render(c) for c in conversations] == [original.render(c) for c in conversations]


def test_two_workers_write_the_bytes_and_key_of_one(chat, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_RECORDS", 100)  # 21 shards, enough for the pool to start
    pools = []

    class CountedPool(workers.ProcessPoolExecutor):
        def __init__(self, processes, **options):
            pools.append(processes)
            super().__init__(processes, **options)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", CountedPool)
    parquet = write_parquet(tmp_path / "data.parquet", SFT_RECORDS, row_group_size=333)
    mixture = {"general_instructions": 2.0, "math": 1.0, "steering_alignment": 1.0, "tool_use": 1.0, "": 0.0}
    built = {}
    for processes in (1, 2):
        config = DataConfig(train=[str(parquet)], seq_len=256, mixture=mixture, workers=processes)
        built[processes] = prepare_sft_dataset(chat, config, 0, tmp_path / f"cache-{processes}")
    assert pools == [2]
    assert built[1].name == built[2].name  # the cache key
    names = sorted(path.name for path in built[1].iterdir())
    assert names == sorted(path.name for path in built[2].iterdir())
    assert "mixture_summary.json" in names and "shards" not in names
    _, mismatch, errors = filecmp.cmpfiles(built[1], built[2], names, shallow=False)
    assert (mismatch, errors) == ([], [])
    # And the arrays are those of the samples built in memory, as TokenizedDataset.save writes them.
    samples = pipeline.build_sft_samples([parquet], chat, config, 0).samples
    TokenizedDataset.from_samples(samples).save(tmp_path / "reference")
    arrays = ["tokens.npy", "labels.npy", "offsets.npy", "categories.txt"]
    assert filecmp.cmpfiles(built[2], tmp_path / "reference", arrays, shallow=False)[0] == arrays


MEASURE_PEAK_RSS = """
import resource, sys
from pathlib import Path
from hermes.config import DataConfig
from hermes.data.chat import ChatFormat
from hermes.data.pipeline import bundled_example, prepare_sft_dataset
from hermes.data.tokenizer import Tokenizer

def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

if __name__ == "__main__":
    data, cache = sys.argv[1:]
    chat = ChatFormat(Tokenizer.default())
    prepare_sft_dataset(chat, DataConfig(workers=1), 0, Path(cache) / "warm-up")  # tokenizer, memos, imports
    before = peak_bytes()
    directory = prepare_sft_dataset(chat, DataConfig(train=[data], seq_len=8192, workers=1), 0, Path(cache))
    print(peak_bytes() - before, directory)
"""


@pytest.mark.slow
def test_preparing_50k_records_holds_about_one_shard_not_the_corpus(tmp_path):
    data = tmp_path / "big.jsonl"
    with data.open("w") as file:
        for _ in range(25):  # 50,000 records of the bundled mixture, written without holding them
            file.write(bundled_example("sft.jsonl").read_text())
    script = tmp_path / "measure.py"
    script.write_text(textwrap.dedent(MEASURE_PEAK_RSS))
    run = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth, directory = run.stdout.split()[-2:]
    cache_bytes = sum((Path(directory) / f"{name}.npy").stat().st_size for name in ("tokens", "labels"))
    # A shard of 1,024 records holds about 1 MB of raw lines, 3 MB of parsed records and 5 MB of samples
    # as Python lists (one int object per token, a list slot per token and label); beside it the pipeline
    # keeps 16 bytes and a category per sample. The bound is about twice that, and a quarter of what
    # holding the result alone takes: the corpus' tokens and labels as int32 arrays (66 MiB here; as the
    # Python lists of the samples that building in memory holds, about five times as much).
    bound = 16 << 20
    assert cache_bytes > 3 * bound
    assert int(growth) < bound, f"peak RSS grew by {int(growth) / 2**20:.1f} MiB while preparing"
