"""The ``loraops`` command groups, one module each; every module has ``add_commands(sub)``.

Only argparse is imported at the top of these modules: Ray, torch, SQLAlchemy and httpx load
inside the handlers, so ``loraops --help`` stays fast. Shared arguments live in
:mod:`loraops.commands.common`, a leaf that imports no other command module.
"""
