"""The plugin's KV connector: the scheduler <-> worker channel of routing.

- ``connector``: `RecrouteConnector`, a thin `KVConnectorBase_V1` shell;
- ``scheduler``: `SchedulerSide`, page releases, kept-turn matching and saves;
- ``worker``: `WorkerSide`, applies the scheduler's jobs to the model's routed decoder
  and drains its accounting;
- what travels between them each step: ``vllm_recroute/messages.py`` (pure).
"""
