"""Build a small, randomly initialised Qwen2-Audio checkpoint entirely offline.

Tests, the demo and the CPU benchmark need a model that runs the *real* transformers code path
(processor, audio encoder, projector, language model, generation) without downloading 16 GB of weights.
`make_tiny_model` writes such a checkpoint with `save_pretrained`, so the normal loading path
(`load_backend(path)`) loads it exactly like `Qwen/Qwen2-Audio-7B-Instruct`. Its outputs are meaningless
(random weights); only shapes, batching and bookkeeping are realistic.

Everything is deterministic for a given (preset, seed): the tokenizer is trained on a fixed in-code corpus
and the weights come from a seeded generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_tasks.errors import ConfigError

# Special tokens of the real Qwen2-Audio vocabulary that prompts here rely on.
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
LANGUAGE_TAGS = tuple(
    f"<|{lang}|>" for lang in ("en", "zh", "de", "es", "fr", "it", "ja", "ko", "ru", "yue", "unknown")
)
# yes/no variants that must each be one token so `score` can read their probability at one step.
YES_NO_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES", "no", "No", "NO", " no", " No", " NO")

# The Qwen2-Audio-7B-Instruct chat template (ChatML; each audio becomes <|audio_bos|><|AUDIO|><|audio_eos|>).
INSTRUCT_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "a baby is crying in this audio",
    "there is no baby crying in this audio",
    "yes there is a baby crying",
    "no it is only background noise and music",
    "Is there a baby crying in this audio? Answer yes or no.",
    "Detect the language and recognize the speech:",
    "Recognize the speech and output only the transcript.",
    "You are a helpful assistant.",
    "hello world how are you today this is a test of speech recognition",
    "one two three four five six seven eight nine ten",
    "今天天气很好 我们去公园散步 宝宝在哭吗 没有 是的",
    "Guten Tag. Bonjour. Hola. Ciao.",
)


@dataclass(frozen=True)
class Preset:
    """Model dimensions; `bench` mimics the 7B model's cost profile (LM-dominated) at CPU scale."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    audio_d_model: int
    audio_layers: int
    audio_heads: int
    audio_ffn: int
    vocab_size: int | None  # None: smallest multiple of 64 that holds the tokenizer
    init_range: float
    dtype: str  # dtype the weights are saved in


PRESETS: dict[str, Preset] = {
    # Larger init range than the real 0.02 so random logits are decisive (no near-ties under fp32 noise).
    "tiny": Preset(64, 2, 4, 2, 128, 64, 2, 4, 128, None, 0.2, "float32"),
    "bench": Preset(1024, 8, 16, 16, 2816, 256, 2, 4, 1024, None, 0.02, "float32"),
    # Real Qwen2-Audio-7B shapes (text: Qwen-7B; audio: Whisper-large-v3 encoder). GPU only.
    "7b": Preset(4096, 32, 32, 32, 11008, 1280, 32, 20, 5120, 156032, 0.02, "bfloat16"),
}


def build_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's format, trained on a fixed corpus (deterministic, offline)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # split words like Qwen2

    raw = Tokenizer(BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    corpus = list(_CORPUS) * 4 + [" ".join(YES_NO_VARIANTS)] * 50 + list(YES_NO_VARIANTS) * 50
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(corpus, trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in CHAT_TOKENS[1:] + AUDIO_TOKENS + LANGUAGE_TAGS],
    )
    tokenizer.padding_side = "left"
    for variant in YES_NO_VARIANTS:
        if len(tokenizer.encode(variant, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny tokenizer: {variant!r} is not a single token")
    return tokenizer


def _model_config(preset: Preset, tokenizer):
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2Config

    vocab = preset.vocab_size or ((len(tokenizer) + 63) // 64) * 64
    if vocab < len(tokenizer):
        raise ConfigError(f"preset vocab {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = Qwen2Config(
        vocab_size=vocab,
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=preset.init_range,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        bos_token_id=pad_id,
        eos_token_id=pad_id,
    )
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=preset.audio_layers,
        encoder_attention_heads=preset.audio_heads,
        encoder_ffn_dim=preset.audio_ffn,
        d_model=preset.audio_d_model,
        max_source_positions=1500,  # 30 s: the encoder insists on 3000 mel frames
        initializer_range=preset.init_range,
    )
    return Qwen2AudioConfig(
        audio_config=audio,
        text_config=text,
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


def make_tiny_model(
    out_dir: str | Path, preset: str = "tiny", *, seed: int = 0, instruct: bool = True
) -> Path:
    """Write a random-init Qwen2-Audio checkpoint (model, tokenizer, features, processor) to `out_dir`.

    `instruct=False` writes no chat template, so the backend treats it as a base model (raw prompts).
    Returns the directory; ConfigError when `out_dir` is a file, a non-empty directory or cannot be
    created. The `7b` preset
    needs a GPU-sized machine (it allocates ~16 GB in bf16).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our CLI prints one line; shard-writing bars are noise

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):  # its files would mix with the checkpoint's, or be overwritten
        raise ConfigError(f"{out_dir}: directory is not empty; give a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, permission denied, read-only file system
        raise ConfigError(f"{out_dir}: cannot create the directory: {exc.strerror or exc}") from None

    tokenizer = build_tokenizer()
    config = _model_config(spec, tokenizer)
    dtype = getattr(torch, spec.dtype)
    device = "cuda" if preset == "7b" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the saved dtype: the 7b preset would need 34 GB in fp32
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=[eos, im_end] if instruct else [eos],
        pad_token_id=eos,
        bos_token_id=eos,
    )
    model.save_pretrained(out)

    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, return_attention_mask=True
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=INSTRUCT_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    if not instruct:
        _drop_chat_template(out)
    (out / "TINY_MODEL.md").write_text(
        f"Random-init Qwen2-Audio ({preset}, seed {seed}) made by `qwen-tasks make-tiny-model`.\n"
        "Its outputs are meaningless; use it to test the pipeline, not to label audio.\n",
        encoding="utf-8",
    )
    return out


def _drop_chat_template(out: Path) -> None:
    """Remove every saved copy of the chat template so the checkpoint looks like the base model."""
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("chat_template", None) is not None:
                path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
