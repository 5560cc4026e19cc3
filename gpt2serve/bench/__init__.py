"""Benchmarks: offline engine, HTTP load, peer engines, and this machine's ceilings."""
