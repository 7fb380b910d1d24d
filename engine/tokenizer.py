"""Tokenizer loading, the chat-template helper, and the built-in tokenizer of `random:<preset>` models.

A real checkpoint brings its own Hugging Face tokenizer (`tokenizer.json` and `tokenizer_config.json`,
whose chat template we use as is). Models built from random weights have no checkpoint, so tandem
ships one small tokenizer of its own in `tandem/data/`:

- byte-level BPE, so any text round-trips exactly, emoji and other multi-byte characters included
  (a character the merges do not cover falls back to its UTF-8 bytes);
- 2,048 ids, trained with the `tokenizers` library on `builtin_tokenizer_corpus.txt`, a small
  English corpus (prose, dialogue, code, numbers) written for this purpose;
- special tokens `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2) and `<|im_start|>` (3). They are given to
  the trainer first, which is what pins their ids;
- a ChatML-like chat template: `<|im_start|>{role}\\n{content}<|eos|>\\n` per message, so the model
  ends a turn with the one eos token that every stopping rule already knows.

Encoding never adds BOS on its own (the chat template writes it), so `decode(encode(text)) == text`.
The data files are built once by `build_builtin_tokenizer` and committed; loading them is fast and
gives the same ids on every machine. Rebuild with `python -m tandem.engine.tokenizer`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILTIN_BOS_TOKEN = "<|bos|>"
BUILTIN_EOS_TOKEN = "<|eos|>"
BUILTIN_PAD_TOKEN = "<|pad|>"
BUILTIN_IM_START_TOKEN = "<|im_start|>"
# Trainer order is id order: these four come first, so the ids below hold for every rebuild.
BUILTIN_SPECIAL_TOKENS = (BUILTIN_BOS_TOKEN, BUILTIN_EOS_TOKEN, BUILTIN_PAD_TOKEN, BUILTIN_IM_START_TOKEN)
BUILTIN_BOS_TOKEN_ID = 0
BUILTIN_EOS_TOKEN_ID = 1
BUILTIN_PAD_TOKEN_ID = 2
BUILTIN_IM_START_TOKEN_ID = 3
BUILTIN_VOCAB_SIZE = 2048  # a power of two keeps the embedding and LM-head shapes kernel-friendly

BUILTIN_CORPUS_FILE = "builtin_tokenizer_corpus.txt"

# Content may be a string or a list of OpenAI-style parts ({"type": "text", "text": ...});
# transformers drops keys whose value is None, hence the `is defined` test.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is defined and message['content'] is string %}"
    "{{ message['content'] }}"
    "{% elif message['content'] is defined and message['content'] is not none %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Any one of these is a vocabulary AutoTokenizer can build a tokenizer from.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def builtin_tokenizer_dir() -> Path:
    """The packaged folder holding the built-in tokenizer's files."""
    return Path(str(resources.files("tandem") / "data"))


def load_tokenizer(model_dir: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of the checkpoint in `model_dir`, or the built-in one when `model_dir` is None."""
    if model_dir is None:
        return _from_pretrained(builtin_tokenizer_dir(), "the built-in tokenizer")
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(
            f"cannot load a tokenizer from {model_dir!r}: it is not a directory; pass the local "
            "checkpoint directory that holds tokenizer.json and tokenizer_config.json"
        )
    if not any((path / name).is_file() for name in _VOCAB_FILES):
        found = "tokenizer_config.json but" if (path / "tokenizer_config.json").is_file() else "no tokenizer files and"
        raise ValueError(
            f"no tokenizer in {model_dir!r}: it has {found} no vocabulary file (one of "
            f"{', '.join(_VOCAB_FILES)}); copy the tokenizer files of the original checkpoint there"
        )
    return _from_pretrained(path, repr(model_dir))


@functools.cache
def builtin_vocab_size() -> int:
    """Number of ids of the built-in tokenizer, special tokens included: the vocab size a model needs."""
    tokenizer = Tokenizer.from_file(str(builtin_tokenizer_dir() / "tokenizer.json"))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                        tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, ending in the assistant
    prompt; `tools` (OpenAI-style function definitions) go to the template, which describes them
    to the model in its own words."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: add `chat_template` to its "
            "tokenizer_config.json (or a chat_template.jinja file), or send a plain completion prompt"
        )
    _validate_messages(messages)
    kwargs: dict = {"add_generation_prompt": True, "tokenize": True, "return_dict": False}
    if tools:
        kwargs["tools"] = tools
    if _can_sanitize_control_tokens(type(tokenizer)):
        # A user who writes "<|eos|>" in a message gets those characters, not the control token.
        kwargs["sanitize_control_tokens"] = True
    token_ids = tokenizer.apply_chat_template(messages, **kwargs)
    return [int(t) for t in token_ids]


def build_builtin_tokenizer(out_dir: str | Path, corpus_path: str | Path | None = None) -> Path:
    """Train the built-in tokenizer and write tokenizer.json and tokenizer_config.json to `out_dir`."""
    corpus_file = Path(corpus_path) if corpus_path is not None else builtin_tokenizer_dir() / BUILTIN_CORPUS_FILE
    corpus = corpus_file.read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: anything else would break decode(encode(text)) == text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB_SIZE,
        # The corpus is small: merges seen once are still needed to reach the vocab size.
        min_frequency=1,
        special_tokens=list(BUILTIN_SPECIAL_TOKENS),
        # All 256 bytes, whether or not the corpus uses them, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    _check_built_ids(tokenizer.get_vocab(with_added_tokens=True), tokenizer.get_vocab_size())

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config_text = json.dumps(_builtin_tokenizer_config(), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    logger.info("built-in tokenizer written to %s (%d ids)", out, tokenizer.get_vocab_size())
    return out


def _from_pretrained(path: Path, what: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load the tokenizer of {what} from {str(path)!r}: {exc}") from exc
    if not tokenizer.chat_template:
        logger.info("tokenizer of %s has no chat template; chat requests will be refused", what)
    logger.debug("loaded %s tokenizer of %s: %d ids", type(tokenizer).__name__, what, len(tokenizer))
    return tokenizer


def _validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] must be a dict with a string 'role', got {message!r}")


@functools.cache
def _can_sanitize_control_tokens(tokenizer_class: type) -> bool:
    # `sanitize_control_tokens` exists only in recent transformers releases.
    return "sanitize_control_tokens" in inspect.signature(tokenizer_class.apply_chat_template).parameters


def _check_built_ids(vocab: dict[str, int], vocab_size: int) -> None:
    expected = dict(zip(BUILTIN_SPECIAL_TOKENS, range(len(BUILTIN_SPECIAL_TOKENS))))
    actual = {token: vocab.get(token) for token in BUILTIN_SPECIAL_TOKENS}
    if actual != expected:
        raise ValueError(f"built-in tokenizer special ids are {actual}, expected {expected}")
    if vocab_size != BUILTIN_VOCAB_SIZE:
        raise ValueError(
            f"built-in tokenizer has {vocab_size} ids, expected {BUILTIN_VOCAB_SIZE}: the corpus is too "
            "small for that many merges; add text to the corpus"
        )


def _builtin_tokenizer_config() -> dict:
    # Written by hand rather than by save_pretrained, whose output format differs between
    # transformers 4 and 5; these keys read the same in both.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BUILTIN_BOS_TOKEN,
        "eos_token": BUILTIN_EOS_TOKEN,
        "pad_token": BUILTIN_PAD_TOKEN,
        "additional_special_tokens": [BUILTIN_IM_START_TOKEN],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # cleanup rewrites " ." as "." and breaks round trips
        "chat_template": BUILTIN_CHAT_TEMPLATE,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(build_builtin_tokenizer(sys.argv[1] if len(sys.argv) > 1 else builtin_tokenizer_dir()))
