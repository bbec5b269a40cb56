"""The online front end: `pdserve serve`, an OpenAI-compatible HTTP API with streaming and admission."""
