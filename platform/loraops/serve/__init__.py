"""The summarization endpoint on Ray Serve.

- :mod:`loraops.serve.settings` - the serve config file and the application's settings (``args``);
- :mod:`loraops.serve.replica` - the model deployment: base model + registered adapter, batching, live swaps;
- :mod:`loraops.serve.app` - the FastAPI ingress and ``build_app`` (``import_path: loraops.serve.app:build_app``);
- :mod:`loraops.serve.client` - a small HTTP client (timeouts, retries on 503);
- :mod:`loraops.serve.bench` - load generation and the latency benchmark;
- :mod:`loraops.serve.cli` - ``loraops serve``, ``loraops summarize``, ``loraops bench serve``.

Nothing is imported here, so ``import loraops.serve.cli`` (done by ``loraops --help``) loads neither Ray nor torch.
"""
