"""The knowledge base: ingest (sources -> passages), index (keyword + semantic), retrieve
(fusion). `KnowledgeBase` in bot.knowledge.base is the entry point."""
