"""Reference implementations the engine is checked against: ``reference.oracle``, the
routing contract over HF transformers (tests/, tools/gpu_check.py, bench/quality.py).
Not part of the installed package; a package so that tests, tools and benchmarks import
it from the repository root."""
