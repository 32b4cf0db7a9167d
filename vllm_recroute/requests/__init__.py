"""Per-request routing options (``vllm_xargs`` → ``SamplingParams.extra_args``):
``options`` parses and bounds them, ``validation`` turns a bad one into HTTP 400 at
admission, ``resolution`` resolves a request's routing once per process
(`RoutingResolver`)."""
