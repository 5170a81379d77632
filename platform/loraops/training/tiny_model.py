"""The embedded tiny model: Phi architecture, small dimensions, random init, own BPE tokenizer.

Built once per machine into a cache keyed by its recipe (``$XDG_CACHE_HOME/loraops/tiny-phi/<key>``,
``~/.cache`` without the variable), then copied into ``WORKSPACE/models/tiny-phi`` as an ordinary
Hugging Face checkpoint folder and loaded through the same ``from_pretrained`` path as
``microsoft/phi-2``. A user's second workspace, and every test workspace, starts at once. Building and
copying are atomic (a temporary folder renamed into place), so concurrent trials that all need it
cannot see half a model, and one process builds while the others wait for its model (a file lock
beside the cache), so a machine never spends its cores on the same build twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
VOCAB_SIZE = 1500
#: Small but real Phi: 4 layers of 192, 6 heads, partial rotary like Phi-2.
ARCHITECTURE = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=6,
    max_position_embeddings=1024,
    partial_rotary_factor=0.4,
)
SEED = 1234
PRETRAIN_STEPS = 300


def tiny_model_dir(workspace: Path) -> Path:
    return workspace / "models" / "tiny-phi"


def recipe_key() -> str:
    """Changes whenever what the build produces can change: this module, the corpus, the libraries."""
    from loraops.training import builtin_data

    digest = hashlib.sha256()
    for module_file in (__file__, builtin_data.__file__):
        digest.update(Path(module_file).read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()[:16]


def machine_cache_dir() -> Path:
    """Where built tiny models are kept for every workspace of this machine (XDG base directory rule)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraops" / "tiny-phi" / recipe_key()


def ensure_tiny_model(workspace: Path) -> Path:
    """The tiny model's folder in ``workspace``: copied from the machine's cache, built there first if absent."""
    target = tiny_model_dir(workspace)
    if (target / "config.json").is_file():
        return target
    cached = machine_cache_dir()
    if not (cached / "config.json").is_file():
        with _build_lock(cached):
            if not (cached / "config.json").is_file():  # else another process built it while this one waited
                _materialize(cached, build_tiny_model)
                log.info("built the embedded tiny Phi model in %s", cached)
    _materialize(target, lambda staging: shutil.copytree(cached, staging, dirs_exist_ok=True))
    return target


@contextlib.contextmanager
def _build_lock(cached: Path):
    """Held while ``cached`` is built; the kernel releases it if the holder dies, so no stale lock blocks a build."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.parent / f".{cached.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the embedded tiny Phi model in %s", cached)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _materialize(target: Path, fill) -> None:
    """Fill a temporary sibling of ``target`` and rename it into place: readers never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        # OSError: another process finished first; its model is identical (same seed, corpus and libraries).
        with contextlib.suppress(OSError):
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the built-in corpus, with Phi-2's special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def build_tiny_model(folder: Path) -> None:
    """Write tokenizer + random-init Phi weights into ``folder``."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    from loraops.training.builtin_data import corpus_texts, generate_splits

    splits = generate_splits()
    tokenizer = build_tokenizer(corpus_texts(splits))
    tokenizer.save_pretrained(folder)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = PhiConfig(vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **ARCHITECTURE)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = PhiForCausalLM(config)
        pretrain_on_dialogues(model, tokenizer, [row["dialogue"] for row in splits["train"]], PRETRAIN_STEPS)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(folder, safe_serialization=True)


def pretrain_on_dialogues(model, tokenizer, dialogues: list[str], steps: int, batch_size: int = 16, max_tokens: int = 256, lr: float = 3e-3) -> None:
    """Plain language-model training on dialogue text only (no prompts, no summaries).

    Like Phi-2, the base then knows the language but not the task, so base-vs-tuned ROUGE measures
    what the adapter learned. Pre-training on prompt + summary text would hand the base the task.
    """
    import random

    import torch
    from tqdm.auto import tqdm

    from loraops.training.data import pad_batch

    rows = []
    for text in dialogues:
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": ids})
    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in tqdm(range(steps), desc="pre-train tiny base on dialogues", unit="step"):
        batch = pad_batch(rng.sample(rows, batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
