"""Serving surface of vllm-recroute: the `serve` launcher and the endpoint plugin.

launcher.py builds the command line of vLLM's own OpenAI-compatible server with the
routed architecture selected; nothing here reimplements vLLM's server.
"""
