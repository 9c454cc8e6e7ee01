"""Answers from the knowledge base: the SupportService over real Redis, the real knowledge base
(Kiwi, bm25s, offline MiniLM) and a scripted backend. Passages in the prompt, sources after the
reply, strict mode, the channel's `knowledge`/`collection`, and documents added while running."""

from __future__ import annotations

from bot.conversation import ConversationKey, Message
from bot.knowledge.cite import NO_DOCUMENTED_ANSWER, Sources
from bot.llm.base import Delta, Finished
from bot.llm.chain import LLMChain
from bot.platforms.slack.mrkdwn import to_mrkdwn
from bot.prompt import GROUNDING
from bot.sampling import KnowledgeChoice
from bot.service import Failure, SupportService, User
from tests.conftest import make_store
from tests.support.backends import ScriptedLLM
from tests.support.knowledge import knowledge, write_docs

KEY = ConversationKey("slack", "T1", "C1")
ADMIN = User("A", can_configure=True)


async def make(redis, llm, mode="prefer", semantic=True) -> SupportService:
    store = make_store(redis)
    store.knowledge_defaults = KnowledgeChoice(mode, "default")
    svc = SupportService(
        store=store, llm=LLMChain(llm, None), persona="You are the shop's helper.",
        knowledge=knowledge(redis, semantic=semantic), kb_top_k=4,
    )  # fmt: skip
    await svc.llm.start()
    return svc


async def ask(svc, text, key=KEY):
    events = [e async for e in svc.ask(key, User("U1"), text)]
    return events, "".join(e.text for e in events if isinstance(e, Delta))


async def test_passages_open_the_prompt_and_the_reply_ends_with_its_sources(redis, tmp_path):
    llm = ScriptedLLM(answer=lambda messages: "Open your order page and choose Return [1].")
    svc = await make(redis, llm)
    await svc.knowledge.add([str(write_docs(tmp_path / "docs"))], "default")  # type: ignore[union-attr]

    events, text = await ask(svc, "How do I return an item?")
    system = llm.calls[0].messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith("You are the shop's helper.\n\n" + GROUNDING)
    assert (
        "[1] Returns and refunds › How to return an item (https://shop.example/help/returns)\n"
        "You can return any item within 30 days" in system["content"]
    )
    assert llm.calls[0].messages[-1] == {"role": "user", "content": "How do I return an item?"}
    sources = [e for e in events if isinstance(e, Sources)]
    assert isinstance(events[-1], Finished) and len(sources) == 1
    assert sources[0].plain() == (
        "Sources:\n[1] Returns and refunds — https://shop.example/help/returns"
    )
    assert "[1] [Returns and refunds](https://shop.example/help/returns)" in sources[0].markdown()
    # Slack's sink turns the Markdown link into mrkdwn; Discord shows it as a masked link.
    assert "<https://shop.example/help/returns|Returns and refunds>" in to_mrkdwn(
        sources[0].markdown()
    )
    # The stored answer is the model's text: sources are rendered, not remembered.
    assert (await svc.store.history(KEY))[-1] == Message("assistant", text)


async def test_strict_mode_without_a_relevant_passage_never_asks_the_model(redis, tmp_path):
    llm = ScriptedLLM()
    svc = await make(redis, llm, mode="strict")
    await svc.knowledge.add([str(write_docs(tmp_path / "docs"))], "default")  # type: ignore[union-attr]
    events, text = await ask(svc, "What is the capital of Mongolia?")
    assert llm.calls == [] and text == ""
    assert [e.message for e in events if isinstance(e, Failure)] == [NO_DOCUMENTED_ANSWER]
    assert "human" in NO_DOCUMENTED_ANSWER
    # With a relevant passage, strict mode answers from it.
    await ask(svc, "How do I return an item?")
    assert len(llm.calls) == 1 and GROUNDING in llm.calls[0].messages[0]["content"]


async def test_prefer_mode_answers_without_passages_when_none_is_relevant(redis, tmp_path):
    llm = ScriptedLLM()
    svc = await make(redis, llm)
    await svc.knowledge.add([str(write_docs(tmp_path / "docs"))], "default")  # type: ignore[union-attr]
    events, _ = await ask(svc, "What is the capital of Mongolia?")
    assert llm.calls[0].messages[0] == {"role": "system", "content": "You are the shop's helper."}
    assert not any(isinstance(e, Sources) for e in events)


async def test_knowledge_off_in_a_channel_skips_retrieval(redis, tmp_path):
    llm = ScriptedLLM()
    svc = await make(redis, llm)
    await svc.knowledge.add([str(write_docs(tmp_path / "docs"))], "default")  # type: ignore[union-attr]
    reply = await svc.settings(KEY, ADMIN, "knowledge off")
    assert reply.startswith("Updated: knowledge=off.")
    assert "• knowledge = off (set in this channel)" in reply
    await ask(svc, "How do I return an item?")
    assert llm.calls[0].messages[0]["content"] == "You are the shop's helper."


async def test_collection_setting_must_name_an_existing_collection(redis, tmp_path):
    llm = ScriptedLLM()
    svc = await make(redis, llm)
    docs = write_docs(tmp_path / "docs")
    await svc.knowledge.add([str(docs / "warranty.txt")], "hardware")  # type: ignore[union-attr]
    before = await svc.store.channel_settings(KEY)

    for bad, expected in (
        ("collection nope", "`collection` must be a collection in the knowledge base; `nope`"),
        ("collection Bad/Name", "`collection` must be the name of a collection"),
        ("knowledge maybe", "`knowledge` must be off, prefer or strict (got `maybe`)"),
        ("temperature 0.5 collection nope", "`nope` has no documents"),
    ):
        reply = await svc.settings(KEY, ADMIN, bad)
        assert expected in reply and reply.endswith("Nothing was changed."), reply
        assert await svc.store.channel_settings(KEY) == before
        assert await svc.store.settings_log(KEY) == []

    show = await svc.settings(KEY, User("U1"), "show")
    assert "• knowledge = prefer (default)" in show
    assert "• collection = default (default)" in show
    reply = await svc.settings(KEY, ADMIN, "collection=hardware knowledge=strict")
    assert "• collection = hardware (set in this channel)" in reply
    assert "• knowledge = strict (set in this channel)" in reply
    await ask(svc, "How long is the blender warranty?")
    assert "two-year warranty" in llm.calls[0].messages[0]["content"]
    log = await svc.store.settings_log(KEY)
    assert log[0].changes == {"collection": (None, "hardware"), "knowledge": (None, "strict")}
    assert "• collection = default (default)" in await svc.settings(KEY, ADMIN, "reset")


async def test_a_running_bot_answers_from_a_document_added_a_moment_ago(redis, tmp_path):
    llm = ScriptedLLM()
    svc = await make(redis, llm)
    docs = write_docs(tmp_path / "docs")
    await ask(svc, "How long is the blender warranty?")  # builds the (empty) index
    assert llm.calls[-1].messages[0]["content"] == "You are the shop's helper."
    # Another process (the `kb add` command) adds a document ...
    await knowledge(redis).add([str(docs / "warranty.txt")], "default")
    # ... and the next question's turn reads the new version in its own round trip.
    await ask(svc, "How long is the blender warranty?")
    assert "two-year warranty" in llm.calls[-1].messages[0]["content"]


async def test_a_failing_knowledge_base_still_answers_in_prefer_mode(redis, tmp_path, caplog):
    llm = ScriptedLLM()
    svc = await make(redis, llm)
    await svc.knowledge.add([str(write_docs(tmp_path / "docs"))], "default")  # type: ignore[union-attr]
    await redis.hset("sb:{kb:default}:passages", "broken#0", "not json")
    _, text = await ask(svc, "How do I return an item?")
    assert text == "echo: How do I return an item?"
    assert "knowledge search failed" in caplog.text
