"""Training scripts of the demo VLMs. Not part of the installed package (pyproject lists
only ``vllm_recroute*``); a package so that tests import them as ``training.train`` from
the repository root, as they import ``tests.helpers``. Run them as scripts from the root:
``python training/train.py ...``."""
