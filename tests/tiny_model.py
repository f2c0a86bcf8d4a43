"""A tiny random-weight test model, built locally in seconds (no model hub): a test fixture.

Used by the vLLM test tier (tests/vllm/conftest.py) and the vLLM metrics test. Runs in the test process;
owns no socket. `build_tiny_model` writes a 2-layer Llama with a BPE tokenizer trained on the standard
library's sources and a ChatML chat template; it generates gibberish fast.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

# The ChatML template of SmolLM2 without its default system prompt: the tiny model's tokenizer uses it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(dest: Path, vocab_size: int = 4096, seed: int = 0) -> Path:
    """Write a random-weight 2-layer Llama (hidden 128, head_dim 64) with a ChatML tokenizer to `dest`.

    Deterministic for a given seed and library versions, so its greedy output is stable within a run.
    """
    return _write_llama(Path(dest), vocab_size, seed, CHATML_TEMPLATE)


def _write_llama(dest: Path, vocab_size: int, seed: int, template: str, added_tokens: Any = ()) -> Path:
    """The tiny Llama and its tokenizer (plus `added_tokens`, tokenizers.AddedToken) with `template`."""
    import torch
    from transformers import LlamaForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    backend = _train_tokenizer(vocab_size)
    if added_tokens:
        backend.add_tokens(list(added_tokens))
    tokenizer = _chatml_tokenizer(backend, template)
    tokenizer.save_pretrained(dest)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(backend, tokenizer)).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(dest)
    return dest


def _chatml_tokenizer(backend: Any, template: str) -> Any:
    """A transformers tokenizer around a trained `tokenizers` backend, ChatML's special tokens named."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


def _llama_config(backend: Any, tokenizer: Any) -> Any:
    """The 2-layer Llama text model every tiny model here uses (hidden 128, head_dim 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_local_corpus(), trainer=trainer)
    return tok


def _local_corpus(max_bytes: int = 3_000_000) -> list[str]:
    """English-ish text that every Python install has: the standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


# A ChatML template that also renders content parts: text as is, each image as the `<image>` placeholder,
# which the processor expands to the image's tokens.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_SIZE = 56  # pixels a side the processor resizes every image to: 4 x 4 patches of 14, 4 tokens
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def build_tiny_idefics3(dest: Path, vocab_size: int = 4096, seed: int = 0) -> Path:
    """Write a random-weight Idefics3 (a 2-layer SigLIP-like vision tower seeing 56 px images as 4 tokens,
    and a 2-layer Llama like `build_tiny_model`'s) with its processor: the ChatML tokenizer plus the image
    tokens, an image processor that does not split images, and a chat template that renders image content
    parts. Idefics3 because vLLM serves it on CPU without torchvision (LLaVA, Qwen2-VL, Gemma 3 need it)
    and takes several images per prompt. Deterministic for a given seed and library versions."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    backend = _train_tokenizer(vocab_size)
    backend.add_special_tokens(IMAGE_TOKENS)
    tokenizer = _chatml_tokenizer(backend, CHATML_IMAGE_TEMPLATE)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHATML_IMAGE_TEMPLATE)
    processor.save_pretrained(dest)

    torch.manual_seed(seed)
    vision = Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14)
    text = _llama_config(backend, tokenizer)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(dest)
    return dest

# ChatML whose generation prompt opens a thought, as DeepSeek-R1's does: the model's output is reasoning up
# to `</think>`, then content. `enable_thinking: false` (chat_template_kwargs, or vLLM's
# `reasoning_effort: "none"`) closes the thought in the prompt instead, as Qwen3's template does.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}")
THINK_TOKENS = ("<think>", "</think>")


def build_tiny_reasoning_model(dest: Path, vocab_size: int = 4096, seed: int = 0) -> Path:
    """The tiny model of `build_tiny_model` for a reasoning parser (vLLM's `deepseek_r1`): `<think>` and
    `</think>` are single added tokens of its tokenizer, not special ones (so, as in DeepSeek-R1's
    tokenizer, their text stays in the output for the parser to split on), and its chat template opens a
    thought (THINKING_TEMPLATE). The ids of the two tokens: `think_token_ids(dest)`."""
    from tokenizers import AddedToken

    return _write_llama(Path(dest), vocab_size, seed, THINKING_TEMPLATE,
                        [AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])


def think_token_ids(model_dir: Path) -> tuple[int, int]:
    """The ids of `<think>` and `</think>` in a model written by `build_tiny_reasoning_model`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    start, end = (tok.convert_tokens_to_ids(t) for t in THINK_TOKENS)
    return int(start), int(end)

# THINKING_TEMPLATE made tool-capable the way Hermes 2 Pro's and Qwen's ChatML templates are: the tools
# listed in a system turn inside `<tools></tools>`, an assistant's tool calls as `<tool_call>{json}</tool_call>`
# and a tool's result as a user turn in `<tool_response></tool_response>`; what vLLM's `hermes` tool
# parser reads back from the output.
TOOLS_THINKING_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nYou may call these functions:\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\nCall one as <tool_call>{\"name\": name, \"arguments\": {...}}</tool_call>.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")


def build_tiny_tool_reasoning_model(dest: Path, vocab_size: int = 4096, seed: int = 0) -> Path:
    """The tiny reasoning model of `build_tiny_reasoning_model` for a deployment with a tool parser too
    (vLLM's `hermes` with `deepseek_r1`): `<tool_call>` and `</tool_call>` are added tokens as well (not
    special, as `<think>`), and its chat template (TOOLS_THINKING_TEMPLATE) lists the request's tools,
    renders earlier tool calls and tool results, and opens a thought."""
    from tokenizers import AddedToken

    return _write_llama(Path(dest), vocab_size, seed, TOOLS_THINKING_TEMPLATE,
                        [AddedToken(t, special=False, normalized=False)
                         for t in THINK_TOKENS + TOOL_CALL_TOKENS])
