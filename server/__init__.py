"""Serving surface of vllm-recroute (installed as `vllm_recroute_server`).

launcher.py builds the command line of vLLM's own OpenAI-compatible server with the
routed architecture selected; nothing here reimplements vLLM's server.
"""
