"""The training recipe: one QLoRA run, from dialogues to a saved adapter and its ROUGE evaluation.

Nothing is imported here, so importing a submodule loads only what it needs.
"""
