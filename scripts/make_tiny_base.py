"""Make the bundled tiny base model, with snug itself:

1. train a byte-level BPE tokenizer on data/corpus with the `tokenizers` library, with ChatML
   turn markers and a ChatML chat template;
2. write a randomly initialised Llama-architecture model (about 3.7M parameters, 15 MB in fp32);
3. pretrain it with `snug train examples/pretrain_tiny.yaml` (train.stage=pt, method full);
4. copy the result into models/tiny.

Run: python scripts/make_tiny_base.py   (about 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from snug.data.templates import BUILTIN

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "runs/tiny-init"
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(corpus: Path, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    texts = [json.loads(line)["text"] for line in corpus.open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = BUILTIN["chatml"]
    return fast


def init_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def main() -> None:
    tok = train_tokenizer(ROOT / "data/corpus/corpus.jsonl")
    model = init_model(tok)
    n = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens; model: {n:,} parameters")
    shutil.rmtree(INIT, ignore_errors=True)
    model.save_pretrained(INIT)
    tok.save_pretrained(INIT)
    cmd = [
        sys.executable,
        "-m",
        "snug.cli",
        "train",
        str(ROOT / "examples/pretrain_tiny.yaml"),
        *sys.argv[1:],
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    target = ROOT / "models/tiny"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "runs/pretrain-tiny/model", target)
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
