"""Text in and out: the tokenizer, incremental detokenisation with stop strings, chat templates."""
