"""Build a tiny, randomly initialised original Qwen-Audio checkpoint from the public QwenLM/Qwen-Audio code.

Run it with the Qwen-Audio environment's interpreter (transformers 4.x; the remote code does not load
under transformers 5):

    .venv-qwen-audio/bin/python tests/qwen_audio_tiny.py --code "$QWEN_AUDIO_CODE_DIR" OUT_DIR

`--code` is a copy of the GitHub repository (nothing of it is committed here). The checkpoint keeps the
repository's `config.json` with small sizes (text hidden 64, 2 layers; audio encoder n_state 64,
2 layers), its tokenizer files (`qwen.tiktoken`, the real 151k-token vocabulary plus the audio and task
special tokens), its model code and `mel_filters.npz`, and is written with `save_pretrained`, so it loads
through exactly the path a downloaded `Qwen/Qwen-Audio` does (`trust_remote_code=True`). Its outputs are
meaningless (random weights).

One file is added: the GitHub copy lacks `cpp_kernels.py` (on the hub it builds the CUDA kernels of the
GPTQ-quantised KV cache). `modeling_qwen.py` names it in a relative import, so transformers insists on the
file, yet imports it only with `use_cache_quantization` and `use_cache_kernel`, both off. The file written
here raises ImportError if it is ever imported, which `modeling_qwen.py` already handles (it warns and
runs without those kernels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# What the checkpoint needs from the repository: model and tokenizer code, tokenizer vocabulary, config,
# the mel filterbank the audio front end loads from next to audio.py.
CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "audio.py",
              "tokenization_qwen.py")  # fmt: skip
DATA_FILES = ("config.json", "tokenizer_config.json", "qwen.tiktoken", "mel_filters.npz")

# Small sizes; everything else (vocabulary, special token ids, audio front end) is the real model's.
TEXT_SIZES = {"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_hidden_layers": 2,
              "intermediate_size": 128}  # fmt: skip
AUDIO_SIZES = {"n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": 64}

CPP_KERNELS_PLACEHOLDER = '''"""Placeholder for the hub's cpp_kernels.py (absent from the GitHub repository).

The hub file compiles CUDA kernels for the GPTQ-quantised KV cache; modeling_qwen.py imports it only with
use_cache_quantization and use_cache_kernel, and handles ImportError by running without them.
"""

raise ImportError("cpp_kernels: the quantised KV-cache kernels are not part of this checkpoint")
'''


def missing_files(code_dir: Path) -> list[str]:
    """Files this builder needs that `code_dir` lacks (empty when it looks like the repository)."""
    return [name for name in (*CODE_FILES, *DATA_FILES) if not (code_dir / name).is_file()]


def build(code_dir: Path, out: Path, *, seed: int = 0, chat: bool = False) -> Path:
    """Write the tiny checkpoint to `out` and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = missing_files(code_dir)
    if missing:
        raise SystemExit(f"{code_dir}: not a QwenLM/Qwen-Audio checkout (missing {', '.join(missing)})")
    staging = out.with_name(out.name + "_code")  # a dot in the name breaks transformers_modules imports
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (*CODE_FILES, *DATA_FILES):
        shutil.copy2(code_dir / name, staging / name)
    (staging / "cpp_kernels.py").write_text(CPP_KERNELS_PLACEHOLDER, encoding="utf-8")
    config = json.loads((code_dir / "config.json").read_text(encoding="utf-8"))
    config.update(TEXT_SIZES)
    config["audio"] = {**config["audio"], **AUDIO_SIZES}
    config["fp32"] = True  # CPU; the real config leaves precision to the model (bf16 on a GPU)
    (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = "chat_generation_config.json" if chat else "base_generation_config.json"
    shutil.copy2(code_dir / generation, staging / "generation_config.json")

    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(str(staging), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(staging), trust_remote_code=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # save_pretrained writes the model and tokenizer code; the remaining files are copied as they are.
    for name in ("qwen.tiktoken", "mel_filters.npz", "cpp_kernels.py", "generation_config.json"):
        shutil.copy2(staging / name, out / name)
    shutil.rmtree(staging)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--code", type=Path, required=True, help="a copy of QwenLM/Qwen-Audio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="Qwen-Audio-Chat generation config (ChatML)")
    args = parser.parse_args(argv)
    out = build(args.code.expanduser().resolve(), args.out.expanduser().resolve(), seed=args.seed,
                chat=args.chat)  # fmt: skip
    print(out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
