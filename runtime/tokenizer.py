"""Tokenizer for the runtime: ``tokenizers`` (tokenizer.json), or ``sentencepiece``
(tokenizer.model) when that is all the checkpoint has, as LLaVA's original checkpoints do.

Both reproduce transformers' Llama tokenizer, including the ``legacy`` flag: with
``legacy: false`` text that follows a special token (``</s>USER: ...``) gets no leading space.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gammamod.errors import GammamodError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: str, impl, specials: dict[str, int], names: dict[str, str], add_bos: bool,
                 legacy: bool):
        self.backend = backend  # "tokenizers" | "sentencepiece"
        self._impl = impl
        self.specials = specials  # special token text -> id
        self._names = names  # bos_token / eos_token / unk_token -> text
        self.add_bos = add_bos
        self.legacy = legacy

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike, prefer: str = "tokenizers") -> "Tokenizer":
        """Load tokenizer.json (``tokenizers``) or tokenizer.model (``sentencepiece``) from ``path``."""
        d = Path(path)
        cfg = _read_json(d / "tokenizer_config.json")
        special_map = _read_json(d / "special_tokens_map.json")
        names = {}
        for role, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            names[role] = _token_text(cfg.get(role)) or _token_text(special_map.get(role)) or default
        add_bos = bool(cfg.get("add_bos_token", True))
        legacy = bool(cfg.get("legacy", True))
        have_json, have_model = (d / "tokenizer.json").is_file(), (d / "tokenizer.model").is_file()
        if have_json and (prefer == "tokenizers" or not have_model):
            return cls._from_json(d / "tokenizer.json", names, add_bos, legacy)
        if have_model:
            return cls._from_sentencepiece(d / "tokenizer.model", cfg, names, add_bos, legacy)
        raise GammamodError(f"{d}: no tokenizer (expected tokenizer.json or tokenizer.model)")

    @classmethod
    def _from_json(cls, path: Path, names: dict, add_bos: bool, legacy: bool) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            impl = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise GammamodError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        specials = {}
        for text in names.values():
            idx = impl.token_to_id(text)
            if idx is not None:
                specials[text] = idx
        for added in impl.get_added_tokens_decoder().values():
            if added.special:
                specials[added.content] = impl.token_to_id(added.content)
        return cls("tokenizers", impl, specials, names, add_bos, legacy)

    @classmethod
    def _from_sentencepiece(cls, path: Path, cfg: dict, names: dict, add_bos: bool, legacy: bool) -> "Tokenizer":
        import sentencepiece as spm

        try:
            impl = spm.SentencePieceProcessor(model_file=str(path))
        except Exception:
            raise GammamodError(f"{path}: not a valid sentencepiece model") from None
        specials = {}
        for text in names.values():
            idx = impl.piece_to_id(text)
            if idx != impl.unk_id() or text == names["unk_token"]:
                specials[text] = idx
        for idx, added in (cfg.get("added_tokens_decoder") or {}).items():
            if added.get("special"):
                specials[added["content"]] = int(idx)
        return cls("sentencepiece", impl, specials, names, add_bos, legacy)

    # -- ids of the special tokens ------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.specials[self._names["bos_token"]]

    @property
    def eos_id(self) -> int:
        return self.specials[self._names["eos_token"]]

    @property
    def vocab_size(self) -> int:
        if self.backend == "tokenizers":
            return self._impl.get_vocab_size(with_added_tokens=True)
        return self._impl.get_piece_size()

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when the tokenizer adds it (``add_bos_token``)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if self.backend == "tokenizers":
            ids = self._impl.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp_encode(text)
        return ([self.bos_id] if add_bos else []) + ids

    def _sp_encode(self, text: str) -> list[int]:
        """transformers' slow LlamaTokenizer over sentencepiece (what the authors load, with
        use_fast=False): special tokens are split out first. With ``legacy: false`` only the very
        start of the text gets the dummy-prefix space, so text after ``</s>`` gets none."""
        sp = self._impl
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
        if self.legacy or not text:
            ids: list[int] = []
            for piece in re.split(pattern, text) if self.specials else [text]:
                if piece in self.specials:
                    ids.append(self.specials[piece])
                elif piece:
                    ids.extend(sp.encode(piece))
            return ids
        plain = self._no_dummy_prefix()
        unk = self._names["unk_token"]
        unk_len = len(plain.encode(unk))
        text = "\u2581" + text.replace("\u2581", " ")
        pieces: list[int | str] = []
        for piece in re.split(pattern, text) if self.specials else [text]:
            if piece in self.specials:
                pieces.append(piece)
            elif piece.startswith(("\u2581", " ")):
                pieces.extend(plain.encode(unk + piece)[unk_len:])
            elif piece:
                pieces.extend(plain.encode(piece))
        if len(pieces) > 1 and pieces[0] == plain.piece_to_id("\u2581") and isinstance(pieces[1], str):
            pieces = pieces[1:]  # a lone prefix space before a special token is dropped
        return [self.specials[p] if isinstance(p, str) else p for p in pieces]

    def _no_dummy_prefix(self):
        """The same sentencepiece model with ``add_dummy_prefix`` off (as the slow tokenizer loads it)."""
        if getattr(self, "_plain", None) is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as model_pb2

            proto = model_pb2.ModelProto()
            proto.ParseFromString(self._impl.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._plain

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "tokenizers":
            return self._impl.decode(ids, skip_special_tokens=skip_special)
        special_ids = set(self.specials.values())
        size = self._impl.get_piece_size()
        keep = [i for i in ids if 0 <= i < size and not (skip_special and i in special_ids)]
        return self._impl.decode(keep)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GammamodError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
