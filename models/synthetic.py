"""Small random-init models and LoRA adapters written to disk in Hugging Face / PEFT layout.

Used by the tests, the benchmarks and the demo: nothing can be downloaded on the machines this
project is built on, so every model they need is made here. The files are ordinary ones:
`transformers.AutoModelForCausalLM`, `peft.PeftModel` and the engine load them alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving many fine-tuned adapters on one base model costs about what serving one does.",
    "Continuous batching lets sequences join and leave between decode steps.",
    "Paged attention keeps the key-value cache in fixed-size blocks.",
    "Bonjour, ça va? Grüße aus München! Añadir café, naïve résumé.",
    "日本語のテキストと中文文本 and emoji 🙂🚀 mixed with ASCII.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>?/|\\~`'\"",
] * 20


def build_tokenizer(directory: Path, vocab_size: int = 512, style: str = "byte_level") -> None:
    """Train a small BPE tokenizer and save it as a normal `tokenizer.json` (+ config files).

    style "byte_level" is GPT-2 / Llama-3 like; "metaspace" uses SentencePiece's "▁" spaces with
    byte fallback, like Llama-2 / Mistral tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    if style == "byte_level":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = []
    else:
        raise ValueError(f"style must be 'byte_level' or 'metaspace', got {style!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if style == "metaspace":
        # Byte-fallback pieces <0x00>..<0xFF> must be ordinary vocabulary (as in SentencePiece), not
        # special tokens, or skip_special_tokens would drop every byte-encoded character.
        state = json.loads(tok.to_str())["model"]
        vocab = dict(state["vocab"])
        for i in range(256):
            vocab.setdefault(f"<0x{i:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
        tok.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))


def build_model(
    directory: Path,
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, object] | None = None,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random-init Llama / Mistral / Qwen2 causal LM saved with safetensors and a tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tokenizer(directory, vocab_size=vocab_size or 512)
    else:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    vocab = vocab_size or len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)
    configs = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in configs:
        raise ValueError(f"family must be one of {sorted(configs)}, got {family!r}")
    if family == "mistral":
        common["sliding_window"] = max_position_embeddings
    config = configs[family](**common)
    state = random_state_dict(config, seed=seed, std=init_std)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]]
    config.save_pretrained(str(directory))
    return directory


def random_state_dict(config: object, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Weights named as Hugging Face's Llama-family checkpoints, drawn without building the module."""
    g = torch.Generator().manual_seed(seed)
    c = config
    h = c.hidden_size  # type: ignore[attr-defined]
    heads = c.num_attention_heads  # type: ignore[attr-defined]
    kv_heads = c.num_key_value_heads  # type: ignore[attr-defined]
    head_dim = getattr(c, "head_dim", None) or h // heads
    inter = c.intermediate_size  # type: ignore[attr-defined]
    vocab = c.vocab_size  # type: ignore[attr-defined]
    qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))  # type: ignore[attr-defined]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=g)

    state = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": norm_weight()}
    for i in range(c.num_hidden_layers):  # type: ignore[attr-defined]
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "post_attention_layernorm.weight"] = norm_weight()
        state[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, h)
        state[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, h)
        state[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, h)
        state[p + "self_attn.o_proj.weight"] = normal(h, heads * head_dim)
        if qkv_bias:
            state[p + "self_attn.q_proj.bias"] = normal(heads * head_dim)
            state[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim)
            state[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim)
        state[p + "mlp.gate_proj.weight"] = normal(inter, h)
        state[p + "mlp.up_proj.weight"] = normal(inter, h)
        state[p + "mlp.down_proj.weight"] = normal(h, inter)
    if not c.tie_word_embeddings:  # type: ignore[attr-defined]
        state["lm_head.weight"] = normal(vocab, h)
    return state


def build_adapter(
    directory: Path,
    base_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.05,
    layers: Sequence[int] | None = None,
    extra_config: dict[str, object] | None = None,
) -> Path:
    """A PEFT-format LoRA adapter with random A and **non-zero** random B (PEFT would init B to 0)."""
    from transformers import AutoConfig

    from engine.model_arch import ModelArch

    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(base_dir)))
    shapes = arch.module_shapes()
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    layer_ids = range(arch.num_layers) if layers is None else layers
    for i in layer_ids:
        for module in targets:
            fan_in, fan_out = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": list(layers) if layers is not None else None,
        "inference_mode": True,
    }
    config.update(extra_config or {})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory
