"""The offline front end: the OpenAI batch format, the journal that makes a batch resumable, run-batch."""
