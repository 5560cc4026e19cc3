"""Zero-shot evaluation (`gpt2serve eval`): the GPT-2 paper's Table 3 tasks, in process or over --api.

tasks.py (requests + metrics), detokenize.py, data.py (files), scoring.py (backends),
published.py (the paper's numbers), report.py, cli.py. Methods: METHODS.md.
"""
