import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import collate_packed
from omegaconf import OmegaConf

from lmtune.data import DataError
from lmtune.data.batching import batch_indices, collate, pack
from lmtune.data.sequences import Sequence, chat_sequence, split, text_windows
from lmtune.data.sources import load_rows, parse_play, passages_from_scenes
from lmtune.pipeline.params import compose_conf

DEFAULT_DATA = compose_conf(
    [], conf_dir=Path(__file__).resolve().parents[2] / "conf"
).data  # data=shakespeare

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand, and unfold yourself.

_Exit_

### SCENE II. A room of state in the castle.

**HAMLET**  
[Aside]_  
A little more than kin, and less than kind.  
_Aside_ Not so, my lord.
"""


def test_parse_play_keeps_speeches_and_speakers_drops_headings_and_directions():
    scenes = parse_play(PLAY)
    assert scenes == [
        ["BERNARDO:\nWho's there?", "FRANCISCO:\nNay, answer me: stand, and unfold yourself."],
        ["HAMLET:\nA little more than kin, and less than kind.\nNot so, my lord."],
    ]
    text = "\n".join(s for scene in scenes for s in scene)
    assert "#" not in text and "_" not in text and "Exit" not in text and "SCENE" not in text


def test_parse_play_options():
    assert parse_play(PLAY, keep_speakers=False)[0][0] == "Who's there?"
    with_directions = "\n".join(parse_play(PLAY, keep_directions=True)[0])
    assert "[FRANCISCO at his post. Enter to him BERNARDO]" in with_directions
    assert "[Exit]" in with_directions


def test_passages_group_speeches_of_a_scene_up_to_the_size():
    scenes = [["A:\n" + "x" * 30, "B:\n" + "y" * 30, "C:\n" + "z" * 30], ["D:\n" + "w" * 30]]
    passages = passages_from_scenes(scenes, passage_chars=70, min_chars=10)
    assert passages == [scenes[0][0] + "\n\n" + scenes[0][1], scenes[0][2], scenes[1][0]]
    assert passages_from_scenes(scenes, 70, min_chars=100) == []


def test_split_is_deterministic_disjoint_and_seeded():
    rows = [{"text": f"passage {i}", "source": "x"} for i in range(200)]
    a, b = split(rows, 1, 0.1, 0.1), split(rows, 1, 0.1, 0.1)
    assert a == b
    texts = {k: {r["text"] for r in v} for k, v in a.items()}
    assert len(texts["validation"]) == len(texts["test"]) == 20 and len(texts["train"]) == 160
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    assert split(rows, 2, 0.1, 0.1)["test"] != a["test"]
    with pytest.raises(DataError, match="too few"):
        split(rows[:2], 1, 0.1, 0.1)


def test_batch_order_is_a_pure_function_of_seed_and_index():
    n, bs = 10, 3
    first_epoch = [i for k in range(3) for i in batch_indices(n, bs, 7, k)]
    assert len(set(first_epoch)) == 9  # a permutation, no repeats within an epoch
    assert batch_indices(n, bs, 7, 4) == batch_indices(n, bs, 7, 4)
    assert batch_indices(n, bs, 7, 3) != batch_indices(n, bs, 7, 0)  # next epoch reshuffles


def test_collate_masks_padding_right_and_left():
    batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    left = collate([[5, 6, 7], [8]], pad_id=0, left_pad=True)
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["input_ids"].dtype == torch.long


def test_the_shipped_corpora_load():
    rows, dropped = load_rows(DEFAULT_DATA)
    assert len(rows) > 5000 and dropped["too_short"] > 0
    assert len({r["source"] for r in rows}) == 38
    assert all(r["text"].split("\n")[0].endswith(":") for r in rows[:100])
    chat = compose_conf(["data=chatterbot_qa"], conf_dir=Path(__file__).resolve().parents[2] / "conf").data
    rows, dropped = load_rows(chat)
    assert len(rows) > 800 and dropped["duplicate"] > 0  # the corpus repeats many conversations
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant" for r in rows)


def files_cfg(tmp_path, name, content, **kw):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return OmegaConf.merge(
        compose_conf(
            ["data=files", "data.files=[x]"], conf_dir=Path(__file__).resolve().parents[2] / "conf"
        ).data,
        {"files": [str(path)], "dir": str(tmp_path), "min_chars": 1, **kw},
    )


def texts(cfg):
    return [r["text"] for r in load_rows(cfg)[0]]


def test_every_file_format_loads_through_datasets(tmp_path):
    import pandas as pd

    assert texts(files_cfg(tmp_path, "a.jsonl", '{"text": "one"}\n\n{"text": "two"}\n')) == ["one", "two"]
    assert texts(files_cfg(tmp_path, "b.txt", "first block\nline\n\nsecond\n")) == [
        "first block\nline",
        "second",
    ]
    assert texts(files_cfg(tmp_path, "c.csv", 'id,body\n1,"a, b"\n2,c\n', text_column="body")) == [
        "a, b",
        "c",
    ]
    pd.DataFrame({"text": ["p", "q"]}).to_parquet(tmp_path / "d.parquet")
    assert texts(files_cfg(tmp_path, "e.json", '[{"text": "r"}]', files=[str(tmp_path / "d.parquet")])) == [
        "p",
        "q",
    ]
    assert texts(files_cfg(tmp_path, "f.json", '[{"text": "r"}, {"text": "s"}]')) == ["r", "s"]
    globbed = files_cfg(tmp_path, "g.jsonl", '{"text": "t"}\n', files=[str(tmp_path / "[ag].jsonl")])
    assert texts(globbed) == ["one", "two", "t"]  # sorted by file name


def test_cleaning_counts_what_it_drops(tmp_path):
    rows = (
        '{"text": "same"}\n{"text": "same"}\n{"text": ""}\n{"text": null}\n{"text": "x"}\n{"text": "kept"}\n'
    )
    kept, dropped = load_rows(files_cfg(tmp_path, "a.jsonl", rows, min_chars=2))
    assert [r["text"] for r in kept] == ["same", "kept"]
    assert dropped == {"duplicate": 1, "empty": 2, "too_short": 1}


@pytest.mark.parametrize(
    "name, content, kw, match",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', {}, r"bad\.jsonl:2: not valid JSON"),
        ("col.jsonl", json.dumps({"body": "x"}) + "\n", {}, r"col\.jsonl:1: no 'text' field"),
        ("dict.jsonl", '{"text": "ok"}\n{"text": {"a": 1}}\n', {}, r"dict\.jsonl:2: 'text' is a dict"),
        (
            "chat.jsonl",
            '{"messages": "hi"}\n',
            {"format": "chat"},
            r"chat\.jsonl:1: 'messages' must be a list",
        ),
        (
            "turns.jsonl",
            '{"messages": [{"role": "user", "content": "q"}]}\n',
            {"format": "chat"},
            r"turns\.jsonl:1: .*must end with an assistant turn",
        ),
        ("empty.txt", "\n\n", {}, "no usable row"),
        ("a.xml", "<a/>", {}, "unsupported file type"),
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), {}, r"latin1\.txt: not UTF-8 text"),
    ],
)
def test_bad_input_names_the_file_and_row(tmp_path, name, content, kw, match):
    with pytest.raises(DataError, match=match):
        load_rows(files_cfg(tmp_path, name, content, **kw))


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    rows = '{"text": "ok"}\n{"text": {"a": 1}}\n{"body": "x"}\n{"text": "fine"}\n'
    kept, dropped = load_rows(files_cfg(tmp_path, "a.jsonl", rows, on_bad_row="skip"))
    # each JSONL line is read as written: a row without the field is a bad row, as one with a dict
    assert [r["text"] for r in kept] == ["ok", "fine"] and dropped == {"bad_row": 2}


def test_missing_and_unwatched_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl matches no file"):
        load_rows(files_cfg(tmp_path, "a.jsonl", '{"text": "x"}\n', files=[str(tmp_path / "nope.jsonl")]))
    outside = files_cfg(tmp_path, "a.jsonl", '{"text": "x"}\n', dir=str(tmp_path / "watched"))
    with pytest.raises(
        DataError, match=r"outside data\.dir=.*watched.*Move it \(or put a link to it\) under"
    ):
        load_rows(outside)
    (tmp_path / "watched").mkdir()
    (tmp_path / "watched/link.jsonl").symlink_to(tmp_path / "a.jsonl")  # DVC hashes what it points at
    linked = OmegaConf.merge(outside, {"files": [str(tmp_path / "watched/link.jsonl")]})
    assert [r["text"] for r in load_rows(linked)[0]] == ["x"]


def test_chat_rows_from_messages_or_prompt_and_response(tmp_path):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"prompt": "2+2?", "response": "4"},
    ]
    cfg = files_cfg(tmp_path, "c.jsonl", "".join(json.dumps(x) + "\n" for x in lines), format="chat")
    rows = [r["messages"] for r in load_rows(cfg)[0]]
    assert rows[0][0] == {"role": "system", "content": "Be brief."}
    assert rows[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_alpaca_and_sharegpt_files_become_conversations_that_learn_only_the_answers(tmp_path, tiny_seqs):
    alpaca = [
        {"instruction": "Translate to French.", "input": f"word {i}", "output": f"mot {i}"} for i in range(30)
    ] + [{"instruction": "Say hello.", "input": "", "output": "Hello."}]
    cfg = files_cfg(tmp_path, "a.jsonl", "".join(json.dumps(x) + "\n" for x in alpaca), format="chat")
    rows = load_rows(cfg)[0]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "Translate to French.\n\nword 0"},  # the input is part of the prompt
        {"role": "assistant", "content": "mot 0"},
    ]
    assert rows[-1]["messages"][0] == {"role": "user", "content": "Say hello."}  # no empty input appended
    parts = split(rows, seed=0, validation_fraction=0.1, test_fraction=0.1)
    assert sum(map(len, parts.values())) == 31 and all(parts.values())  # one instruction, 31 prompts
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "to be or"},
            {"from": "gpt", "value": "not to be"},
        ]
    }
    cfg = files_cfg(tmp_path, "s.json", json.dumps([sharegpt]), format="chat")
    messages = load_rows(cfg)[0][0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    _, tokenizer = tiny_seqs
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    )
    seq = chat_sequence(messages, tokenizer)
    learned = tokenizer.decode([t for t, m in zip(seq, seq.mask, strict=True) if m])
    assert "not to be" in learned and "to be or" not in learned and "Be brief" not in learned
    bad = files_cfg(
        tmp_path, "b.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}), format="chat"
    )
    with pytest.raises(DataError, match=r"b\.jsonl:1: .*from: human\|gpt\|system"):
        load_rows(bad)


def test_one_prompt_for_every_conversation_is_named_as_such():
    rows = [
        {"messages": [{"role": "user", "content": "Same?"}, {"role": "assistant", "content": str(i)}]}
        for i in range(40)
    ]
    with pytest.raises(DataError, match=r"only 1 distinct prompts among 40 conversations.*Alpaca"):
        split(rows, seed=0, validation_fraction=0.1, test_fraction=0.1)


def test_the_hub_offline_fails_at_once_saying_so(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_conf(
        ["data=hub", "data.hub_id=someone/some-data"], conf_dir=Path(__file__).resolve().parents[2] / "conf"
    )
    began = time.perf_counter()
    with pytest.raises(DataError, match=r"hub_id=someone/some-data: HF_HUB_OFFLINE=1.*data=files"):
        load_rows(cfg.data)
    assert time.perf_counter() - began < 5


def test_long_text_becomes_windows_and_nothing_is_lost(tiny_seqs):
    _, tokenizer = tiny_seqs
    text = " ".join(f"word{i}" for i in range(300))
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    windows = text_windows(text, tokenizer, max_length=64, stride=64)
    assert len(windows) > 1 and all(len(w) <= 64 for w in windows)
    assert [t for w in windows for t, m in zip(w, w.mask, strict=True) if m] == ids  # cut, nothing lost
    overlapping = text_windows(text, tokenizer, max_length=64, stride=32)
    learned = [t for w in overlapping for t, m in zip(w, w.mask, strict=True) if m]
    assert learned == ids  # overlap is context only: every token is learned exactly once
    assert text_windows("short", tokenizer, 64, 64)[0].mask is None


def test_chat_template_masks_everything_but_the_answers(tiny_seqs):
    """Multi-turn: every assistant turn carries loss, no prompt token does."""
    _, tokenizer = tiny_seqs
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "to be or"},
        {"role": "assistant", "content": "not to be"},
        {"role": "user", "content": "that is"},
        {"role": "assistant", "content": "the question"},
    ]
    seq = chat_sequence(messages, tokenizer)
    learned = tokenizer.decode([t for t, m in zip(seq, seq.mask, strict=True) if m])
    assert "not to be" in learned and "the question" in learned
    assert "to be or" not in learned and "that is" not in learned and "<|user|>" not in learned
    labels = collate([seq], pad_id=0)["labels"][0]
    assert (labels == -100).sum() == seq.mask.count(0)  # masked tokens carry no loss
    packed = collate_packed([seq, Sequence([5, 6, 7])], pad_id=0, capacity=256)["labels"]
    assert int((packed != -100).sum()) == sum(seq.mask[1:]) + 2  # packing keeps each row's own mask


def test_pack_keeps_every_sequence_whole_within_capacity():
    seqs = [[1] * n for n in (9, 7, 5, 4, 3, 2, 1)]
    rows = pack(seqs, capacity=10)
    assert sorted(len(s) for row in rows for s in row) == sorted(len(s) for s in seqs)
    assert all(sum(len(s) for s in row) <= 10 for row in rows) and len(rows) == 4


def test_packing_a_whole_split_fills_rows_and_rejects_what_cannot_fit():
    lengths = torch.randint(20, 256, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [[i] * n for i, n in enumerate(lengths)]
    rows = pack(seqs, capacity=512)
    placed = sorted(s[0] for row in rows for s in row)
    assert placed == list(range(len(seqs)))  # each sequence exactly once, whole
    assert all(sum(len(s) for s in row) <= 512 for row in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.95  # best-fit leaves little padding
    with pytest.raises(ValueError, match="300 tokens does not fit rows of 256"):
        pack([[0] * 300], capacity=256)


@pytest.mark.parametrize("attention, rows", [("varlen", 1), ("sdpa", 2)])
def test_packed_micro_batches_hold_the_passages_of_padded_ones_without_padding(attention, rows):
    from lmtune.train.step import batch_maker

    seqs = [[i + 1] * (5 + i % 20) for i in range(200)]
    cfg = OmegaConf.create(
        {"seed": 3, "train": {"packing": True, "pack_length": 64, "batch_size": 4, "attention": attention}}
    )
    packed, again = batch_maker(seqs, cfg, pad_id=0), batch_maker(seqs, cfg, pad_id=0)
    padded = batch_maker(seqs, OmegaConf.merge(cfg, {"train": {"packing": False}}), pad_id=0)
    for index in range(40):
        (batch, useful), (plain, plain_useful) = packed(index), padded(index)
        assert Counter(batch["input_ids"].flatten().tolist()) - Counter({0: 10**6}) == Counter(
            plain["input_ids"].flatten().tolist()
        ) - Counter({0: 10**6})  # the same passages, whole
        assert useful == plain_useful == int(plain["attention_mask"].sum())  # padding is not counted
        assert batch["input_ids"].shape[0] <= rows  # one row (varlen), or best-fit rows of 64 (sdpa)
        if attention == "varlen":
            assert batch["input_ids"].numel() == useful  # no padding at all
    assert torch.equal(again(7)[0]["input_ids"], packed(7)[0]["input_ids"])  # a resume sees the same


def test_packed_batch_gives_the_same_logits_and_loss_as_padded(tiny_base, tiny_seqs):
    from lmtune.model.load import load_full

    seqs, tokenizer = tiny_seqs
    seqs = [s[:n] for s, n in zip(seqs[:6], (30, 12, 20, 7, 25, 16), strict=True)]
    model = load_full(tiny_base, torch.float32)
    padded = collate(seqs, tokenizer.pad_token_id)
    packed = collate_packed(seqs, tokenizer.pad_token_id, capacity=40)
    assert packed["input_ids"].shape[0] < len(seqs)  # fewer rows, less padding
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed, use_cache=False).loss
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    with torch.no_grad():  # each sequence's logits inside its row equal those computed alone
        for r, row in enumerate(pack(seqs, 40)):
            start = 0
            for seq in row:
                alone = model(input_ids=torch.tensor([seq])).logits[0]
                assert torch.allclose(logits[r, start : start + len(seq)], alone, atol=1e-4)
                start += len(seq)


def test_one_broken_json_line_is_named_by_its_line_and_follows_on_bad_row(tmp_path):
    """Line numbers count every line of the file (blank ones too), from 1."""
    lines = [json.dumps({"text": f"passage number {i}"}) for i in range(12)]
    lines[9] = ""  # a blank line 10
    lines[10] = '{"text": "cut off'  # line 11
    text = "\n".join(lines) + "\n"
    with pytest.raises(DataError, match=r"a\.jsonl:11: not valid JSON .*data\.on_bad_row=skip"):
        load_rows(files_cfg(tmp_path, "a.jsonl", text))
    kept, dropped = load_rows(files_cfg(tmp_path, "a.jsonl", text, on_bad_row="skip"))
    assert len(kept) == 10 and dropped == {"bad_row": 1}


def test_conversations_read_as_text_and_a_header_only_csv_say_what_they_are(tmp_path):
    chat = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
    )
    with pytest.raises(
        DataError, match=r"c\.jsonl:1: 'messages' holds conversations, not text; set data\.format=chat"
    ):
        load_rows(files_cfg(tmp_path, "c.jsonl", chat + "\n"))
    with pytest.raises(DataError, match=r"no usable row .*the source is empty"):
        load_rows(files_cfg(tmp_path, "h.csv", "text\n"))


@pytest.mark.parametrize(
    "name, content",
    [
        ("bom.jsonl", "\ufeff" + "".join(json.dumps({"text": f"passage {i}"}) + "\n" for i in range(3))),
        ("bom.csv", "\ufefftext\n" + "".join(f"passage {i}\n" for i in range(3))),
        ("bom.json", "\ufeff" + json.dumps([{"text": f"passage {i}"} for i in range(3)])),
    ],
)
def test_a_byte_order_mark_is_read_past_not_refused(tmp_path, name, content):
    """Windows editors start UTF-8 files with a byte-order mark; it is not part of the data."""
    assert texts(files_cfg(tmp_path, name, content.encode("utf-8"))) == [f"passage {i}" for i in range(3)]


def test_a_file_no_row_of_which_fits_the_settings_is_not_advised_to_skip_rows(tmp_path):
    """Skipping bad rows would drop them all: the message names the setting instead."""
    wrong = "".join(json.dumps({"body": f"passage {i}"}) + "\n" for i in range(5))
    with pytest.raises(DataError) as refused:
        load_rows(files_cfg(tmp_path, "a.jsonl", wrong))
    says = str(refused.value)
    assert "a.jsonl:1: no 'text' field (fields: ['body']); set data.text_column" in says
    assert "No row of" in says and "on_bad_row=skip would drop every row" in says
    one_bad = json.dumps({"body": "x"}) + "\n" + json.dumps({"text": "fine"}) + "\n"
    with pytest.raises(DataError, match=r"Fix the row, or set data.on_bad_row=skip"):
        load_rows(files_cfg(tmp_path, "b.jsonl", one_bad))


# A chat template with tool use, in the shape of those that have it (tool schemas in the system
# turn, an assistant's calls as JSON, tool answers as their own turns).
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call: {{ tools | tojson }}{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% for call in m.get('tool_calls', []) %}<call>{{ call['function'] | tojson }}</call>{% endfor %}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML = (  # SmolLM2's shape: role and content, nothing else
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "today's weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def tool_rows(n: int) -> list[dict]:
    """OpenAI fine-tuning rows with a tool call and its answer, the tools in trl's `tools` column."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Weather in city{i}?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": json.dumps({"city": f"city{i}"}),
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": f"call_{i}", "content": f"sunny{i}"},
                {"role": "assistant", "content": f"It is sunny{i} there."},
            ],
            "tools": json.dumps([WEATHER]),
        }
        for i in range(n)
    ]


def test_tool_use_rows_train_on_the_calls_and_answers_not_on_what_tools_return(tmp_path, tiny_seqs):
    from lmtune.data.sequences import require_tool_support, tool_support_problem

    cfg = files_cfg(tmp_path, "t.jsonl", "".join(json.dumps(x) + "\n" for x in tool_rows(3)), format="chat")
    rows = load_rows(cfg)[0]
    assert rows[0]["tools"] == [WEATHER]
    call = rows[0]["messages"][1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "city0"}}  # JSON parsed
    _, tokenizer = tiny_seqs
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert tool_support_problem(tokenizer) is None
    require_tool_support(rows, tokenizer, "tiny")  # no refusal
    seq = chat_sequence(rows[0]["messages"], tokenizer, rows[0]["tools"])
    text = tokenizer.decode(seq)
    learned = tokenizer.decode([t for t, m in zip(seq, seq.mask, strict=True) if m])
    assert "today's weather" in text and "sunny0" in text  # the schemas and the tool's answer are seen
    assert '"get_weather"' in learned and '"city0"' in learned  # the call is learned, its JSON included
    assert "It is sunny0 there." in learned
    assert "Weather in city0" not in learned and "today's weather" not in learned
    assert "<|tool|>\nsunny0" not in learned  # what the tool returned is context, not learned
    tokenizer.chat_template = CHATML
    assert "tool calls" in tool_support_problem(tokenizer) and "tool schemas" in tool_support_problem(
        tokenizer
    )
    with pytest.raises(
        DataError, match=r"t\.jsonl: conversations with tool calls.*tiny has no tool support.*model=qwen3_8b"
    ):
        require_tool_support(rows, tokenizer, "tiny")
    require_tool_support(
        [{"messages": [{"role": "user", "content": "a"}]}], tokenizer, "tiny"
    )  # no tools: fine


@pytest.mark.parametrize(
    "turns, match",
    [
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
            "a tool turn must follow an assistant turn with tool_calls",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                },
            ],
            "tool call 'f': its arguments are not valid JSON",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
            r"role: system\|user\|assistant\|tool",
        ),
    ],
)
def test_malformed_tool_use_is_named_by_file_and_row(tmp_path, turns, match):
    cfg = files_cfg(tmp_path, "t.jsonl", json.dumps({"messages": turns}) + "\n", format="chat")
    with pytest.raises(DataError, match=rf"t\.jsonl:1: .*{match}"):
        load_rows(cfg)
