"""Remote code of the tiny test checkpoints whose HF classes transformers does not ship.

Each module here is standalone (transformers, numpy and PIL only): its builder
(`tiny/keye.py`, `tiny/phi3v.py`, `tiny/minicpmv.py`, through
`common.save_remote_processor`) copies its source into the checkpoint directory, where
``trust_remote_code=True`` loads it, as the published checkpoints ship theirs. Written
for this project from the public behaviour vLLM expects of these processors.
"""
