"""gpt2serve: fast GPT-2 inference behind an OpenAI-compatible API.

Data flows one way: HTTP (api/) -> serving -> engine (engine/) -> scheduler/runner -> model (model/).
accounts/ owns keys, credit and usage; eval/ and bench/ drive the engine in-process or over HTTP.
"""

__version__ = "0.1.0"
