"""The serving engine: batched generation at fixed shapes (see :mod:`loraops.serve.engine.core`).

Nothing is imported here, so importing :mod:`loraops.serve.engine.buckets` (serve settings do) does not load torch.
"""
