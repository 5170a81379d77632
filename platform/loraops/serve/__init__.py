"""The summarization endpoint on Ray Serve.

- :mod:`loraops.serve.settings` - the serve config file and the application's settings (``args``);
- :mod:`loraops.serve.model` - the serving model (base + adapters) and the one loader of a registered version;
- :mod:`loraops.serve.replica` - the model deployment: base model + registered adapter, batching, live swaps;
- :mod:`loraops.serve.app` - the FastAPI ingress and ``build_app`` (``import_path: loraops.serve.app:build_app``);
- :mod:`loraops.serve.client` - a small HTTP client (timeouts, retries on 503);
- :mod:`loraops.serve.canary` - the ingress side of a canary: routing by request id, per-version totals;
- :mod:`loraops.serve.metrics` - per-version Ray metrics (requests, errors, latency, generated tokens);

The commands are in :mod:`loraops.commands.serve`, the benchmark in :mod:`loraops.bench.serve`, plain batched
generation in :mod:`loraops.generate`. Nothing is imported here, so importing a submodule loads only what it needs.
"""
