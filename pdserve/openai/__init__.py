"""The OpenAI API's request and answer formats shared by run-batch and serve."""
