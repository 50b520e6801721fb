"""In-code tokenizers for tiny offline models (no files, no hub): the byte-level character vocabulary of
GPT-2 / CLIP BPE, and a CLIP tokenizer over it.

transformers 5 ignores `vocab_file=` for these tokenizers, so the vocabularies are built here and passed
as objects. `rcgrpo.testing`'s random pipeline, the tiny MiniBench editor and the tiny CLIP use them.
"""
from __future__ import annotations

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2 / CLIP) uses for bytes, in byte order."""
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in visible:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_vocab() -> dict[str, int]:
    """Ids: 0 `<|startoftext|>`, 1 `<|endoftext|>`, then each byte-level character alone and with `</w>`."""
    vocab = {BOS: 0, EOS: 1}
    for ch in byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def char_clip_tokenizer(model_max_length: int = 77):
    """A character-level `CLIPTokenizer` (byte-level pieces, no merges)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=byte_level_vocab(), merges=[])
    tok.model_max_length = int(model_max_length)
    return tok


__all__ = ["BOS", "EOS", "byte_level_alphabet", "byte_level_vocab", "char_clip_tokenizer"]
