"""The OpenAI protocol, as run-batch (pdserve.batch) and the online server (pdserve.serve) both speak it.

requests.py  a request body -> a validated, tokenized router Request (one parser per field group)
responses.py the bodies sent back: completions, stream chunks, usage, errors
records.py   one finished request as an OpenAI batch output record (what run-batch writes, metrics read)
limits.py    what the served model allows a request to ask

It depends on neither front end: both accept and refuse exactly the same bodies, with the same words.
"""
