"""A character-level tokenizer that needs no download: one token per character.

Built with the `tokenizers` library (a BPE model with no merges splits text into single
characters) and saved as `tokenizer.json` + `tokenizer_config.json`, so
`AutoTokenizer.from_pretrained(model_dir)` loads it offline like any Hugging Face tokenizer.
Encoding prepends `<bos>` (as Llama tokenizers do), so lm-eval's `hf` backend feeds the models
exactly the sequences they were trained on.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = tuple(string.ascii_lowercase + string.digits + " \n.,:;!?+-*/=<>()#|'")
VOCAB = SPECIAL_TOKENS + CHARACTERS
VOCAB_SIZE = 64  # the vocabulary padded to a multiple of 8

assert len(VOCAB) <= VOCAB_SIZE


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo's tokenizer: ids 0-3 are `<pad> <bos> <eos> <unk>`, then one id per character."""
    vocab = {token: index for index, token in enumerate(VOCAB)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )


def save_tokenizer(out_dir: Path) -> None:
    build_tokenizer().save_pretrained(out_dir)
