"""Tiny random-weight stand-ins for the hub models mmembed targets, built offline on local disk.

Each ``build_*`` function writes a directory that loads with the real Sentence Transformers class
(``SentenceTransformer``, ``CrossEncoder`` or ``MultiVectorEncoder``) and goes through the same code paths as the hub model
of its family: same transformers architecture, same processor classes, same Sentence Transformers
module stack and config files. Only the sizes are shrunk and the weights are random, so outputs are
meaningless but shapes, dtypes, modalities and preprocessing behave like the real thing.

Tokenizers are trained on the spot from a small built-in word list, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "COLBERT_PROMPTS",
    "QWEN3VL_EMBEDDING_PROMPTS",
    "TINY_MODEL_KINDS",
    "build_tiny_clap",
    "build_tiny_clip",
    "build_tiny_colbert",
    "build_tiny_colqwen2",
    "build_tiny_cross_encoder",
    "build_tiny_qwen3vl_embedder",
    "build_tiny_qwen3vl_reranker",
    "tiny_model",
]

# Prompts stored in config_sentence_transformers.json of the embedder. With a chat-template model,
# Sentence Transformers turns a prompt into a system message, which is how Qwen3-VL-Embedding takes
# its instruction.
QWEN3VL_EMBEDDING_PROMPTS = {
    "query": "Retrieve images or text relevant to the user's query.",
    "document": "Represent the user's input.",
}

# The stock initialisers (std 0.02 for hidden size 768+) make a 32-wide random model map every input
# to nearly the same output, so parity checks between pipelines would pass even when inputs got
# mixed up. Wider initial weights keep outputs clearly input-dependent while staying finite.
_INIT_STD = 0.2
_INIT_FACTOR = 5.0

_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_WORDS = """
a an the of and or to in on at by for with from into over under near about above below after before
is are was were be been being has have had do does did can could will would should may might must
i you he she it we they me him her us them my your his its our their this that these those what which
who whom whose where when why how all any both each few more most other some such no nor not only own
same so than too very yes just also there here then once again still ever never always often sometimes
photo picture image video audio sound music song voice speech text document query passage answer question
cat cats dog dogs bird birds fish horse cow sheep mouse lion tiger bear elephant monkey rabbit duck
car cars bus train plane boat bike road street city town village house home room door window wall
tree trees flower flowers grass forest mountain river lake sea ocean beach sky cloud sun moon star rain
snow wind fire water stone sand field garden park bridge tower castle church school shop market
man men woman women boy girl child children person people baby friend family team player teacher
red green blue yellow black white orange purple pink brown gray grey dark light bright colorful
big small large little tall short long wide old new young hot cold warm cool fast slow happy sad
one two three four five six seven eight nine ten first second third last next many much every
run runs running walk walks walking sit sits sitting stand standing play plays playing eat eats eating
drink sleep sleeping fly flying swim swimming jump jumping look looking see watch read write sing dance
hello world good bad best better great nice beautiful pretty ugly funny quiet loud simple quick brown
fox lazy jumps capital country france paris berlin germany london china beijing planet earth mars
known called famous relevant represent retrieve user input instruct judge whether meets requirements
based provided note candidates search given tone sine wave beep noise ring bell piano guitar drum
system assistant content role
""".split()


def _corpus() -> Iterator[str]:
    # Bare words (lower and capitalised) teach the BPE the space-less form of every word, e.g. "yes"
    # right after a chat-template newline; sentences teach the space-prefixed form. Stepping through
    # the list with a few co-prime strides mixes neighbours without any randomness.
    for _ in range(4):
        yield from _WORDS
    yield from (word.capitalize() for word in _WORDS)
    n = len(_WORDS)
    for stride in (1, 7, 13, 31):
        for start in range(0, n, 3):
            sentence = " ".join(_WORDS[(start + k * stride) % n] for k in range(12))
            yield sentence.capitalize() + "."


def _train_bpe(
    template, vocab_size: int, special_tokens: list[str], end_of_word_suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level BPE vocab and merge list on the built-in corpus.

    Text is split with the normalizer and pre-tokenizer of ``template`` (an empty instance of the
    target tokenizer class), so the result plugs straight into that class. The merge loop is written
    out here instead of using ``tokenizers.trainers.BpeTrainer`` because that trainer breaks ties
    between equally frequent pairs in a per-process random order, which would make two builds of the
    same tiny model differ in token ids and therefore in weights.
    """
    from tokenizers import pre_tokenizers

    backend = template.backend_tokenizer
    word_counts: Counter[str] = Counter()
    for text in _corpus():
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        word_counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *alphabet, *(char + end_of_word_suffix for char in alphabet)]:
        vocab.setdefault(token, len(vocab))
    words = {}
    for word in word_counts:
        symbols = list(word)
        symbols[-1] += end_of_word_suffix
        words[word] = symbols

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        for word, symbols in words.items():
            index, out = 0, []
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    out.append(merged)
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            words[word] = out
        # Fully merged words cannot contribute pairs any more; dropping them keeps the loop short.
        words = {word: symbols for word, symbols in words.items() if len(symbols) > 1}
    return vocab, merges


@contextmanager
def _seeded(seed: int = 0):
    # fork_rng keeps the caller's global RNG untouched; devices=[] avoids initialising CUDA.
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fresh_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"Refusing to build a tiny model into non-empty directory {path}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _qwen_tokenizer():
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _train_bpe(Qwen2Tokenizer(), vocab_size=2048, special_tokens=[])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        model_max_length=4096,
    )
    # Qwen keeps its control tokens after the BPE vocab, as special added tokens in a fixed order, so
    # they are never split and are skipped on decode.
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in _QWEN_SPECIAL_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


# Structured-content Qwen chat template. The vision placeholders are single tokens here; the
# processor expands each into as many <|image_pad|>/<|video_pad|> tokens as the media needs.
_QWEN_RENDER_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

_QWEN3VL_EMBEDDING_CHAT_TEMPLATE = (
    _QWEN_RENDER_MACRO + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>\\n' -}}"
    "{%- set body = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nRepresent the user\\'s input.<|im_end|>\\n' -}}"
    "{%- set body = messages -%}"
    "{%- endif -%}"
    "{%- for message in body -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Reranker template: Sentence Transformers maps a pair to one "query" and one "document" message and a
# prompt to a leading system message, which becomes the instruction; a hand-written "user" message is
# read as the query. The assistant prefix is unconditional because LogitScore reads the next-token
# logits ("yes" vs "no") at the very last position.
_QWEN3VL_RERANKER_CHAT_TEMPLATE = (
    _QWEN_RENDER_MACRO + "{%- set ns = namespace(instruction='Given a search query, retrieve relevant candidates "
    "that answer the query.', query='', document='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.instruction = render(message['content']) -%}"
    "{%- elif message['role'] == 'query' -%}{%- set ns.query = ns.query + render(message['content']) -%}"
    "{%- elif message['role'] == 'document' -%}{%- set ns.document = ns.document + render(message['content']) -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.query = ns.query + render(message['content']) -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be \\"yes\\" or \\"no\\".<|im_end|>\\n\' -}}'
    "{{- '<|im_start|>user\\n<Instruct>: ' + ns.instruction + '\\n<Query>: ' + ns.query + "
    "'\\n<Document>: ' + ns.document + '<|im_end|>\\n<|im_start|>assistant\\n' -}}"
)


def _qwen_image_processor(patch_size: int):
    """Qwen-VL's image processor at a tiny pixel budget: images capped at 128x128 pixels."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128}, patch_size=patch_size,
                                 temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                 image_std=[0.5, 0.5, 0.5])


def _qwen3vl_processor(chat_template: str):
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    # patch 16 x merge 2 gives 32-pixel cells; the pixel budgets below cap an image at 4x4 cells
    # (16 merged tokens) and a video frame at 2x2, which keeps CPU forward passes instant.
    image_processor = _qwen_image_processor(16)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 32 * 32, "longest_edge": 4 * 64 * 64},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        min_frames=2,
        max_frames=4,
        fps=2,
        # The reference (qwen-vl-utils) per-frame pixel cap; also silences transformers' warning.
        cap_pixels_per_frame=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=_qwen_tokenizer(),
        video_processor=video_processor,
        chat_template=chat_template,
    )


def _qwen3vl_config(tokenizer):
    from transformers import Qwen3VLConfig

    head_dim = 16
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                # The three M-RoPE sections (time, height, width) must cover head_dim / 2 rotary pairs.
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "initializer_range": _INIT_STD,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
            "initializer_range": _INIT_STD,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_clip(path: str | os.PathLike) -> str:
    """Build a tiny CLIP that ``SentenceTransformer(path)`` loads with modalities ``text`` and ``image``.

    Mirrors ``sentence-transformers/clip-ViT-B-32``: a single Transformer module that calls
    ``get_text_features`` / ``get_image_features`` and returns projected (unnormalised) embeddings.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = _fresh_dir(path)
    vocab, merges = _train_bpe(
        CLIPTokenizer(), vocab_size=2048, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>"
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_size = 32
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "initializer_factor": _INIT_FACTOR,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
            "projection_dim": 16,
            "initializer_factor": _INIT_FACTOR,
        },
        projection_dim=16,
        initializer_factor=_INIT_FACTOR,
    )
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        CLIPModel(config).save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
        model = SentenceTransformer(modules=[Transformer(hf_dir)], device="cpu")
        model.save(str(path), create_model_card=False)
    return str(path)


def build_tiny_qwen3vl_embedder(path: str | os.PathLike) -> str:
    """Build a tiny Qwen3-VL embedder shaped like ``Qwen/Qwen3-VL-Embedding-2B`` in Sentence Transformers.

    Modules: Transformer (``Qwen3VLModel``, every modality rendered through the chat template with
    ``add_generation_prompt=True``) -> Pooling(lasttoken) -> Normalize. Prompts ``query``/``document``
    become a system message.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import Qwen3VLModel

    path = _fresh_dir(path)
    processor = _qwen3vl_processor(_QWEN3VL_EMBEDDING_CHAT_TEMPLATE)
    config = _qwen3vl_config(processor.tokenizer)
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        Qwen3VLModel(config).save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
        transformer = Transformer(
            hf_dir,
            transformer_task="feature-extraction",
            modality_config={
                "text": dict(forward),
                "image": dict(forward),
                "video": dict(forward),
                "message": {**forward, "format": "structured"},
            },
            module_output_name="token_embeddings",
            processing_kwargs={"chat_template": {"add_generation_prompt": True}},
            # Packed (unpadded) batches would break Qwen-VL's 3-D M-RoPE position ids; the hub
            # config pins this off as well.
            unpad_inputs=False,
        )
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
        model = SentenceTransformer(
            modules=[transformer, pooling, Normalize()],
            prompts=dict(QWEN3VL_EMBEDDING_PROMPTS),
            similarity_fn_name="cosine",
            device="cpu",
        )
        model.save(str(path), create_model_card=False)
    return str(path)


def build_tiny_qwen3vl_reranker(path: str | os.PathLike) -> str:
    """Build a tiny Qwen3-VL reranker shaped like ``Qwen/Qwen3-VL-Reranker-2B`` in Sentence Transformers.

    Modules: Transformer (``Qwen3VLForConditionalGeneration``, task ``any-to-any``, left padding,
    query/document chat template) -> LogitScore(yes, no). ``CrossEncoder.predict`` applies a sigmoid
    to ``logit(yes) - logit(no)``.
    """
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore
    from transformers import Qwen3VLForConditionalGeneration

    path = _fresh_dir(path)
    processor = _qwen3vl_processor(_QWEN3VL_RERANKER_CHAT_TEMPLATE)
    tokenizer = processor.tokenizer
    config = _qwen3vl_config(tokenizer)
    yes_id, no_id = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    if yes_id in (None, tokenizer.unk_token_id) or no_id in (None, tokenizer.unk_token_id):
        raise RuntimeError("The tiny Qwen tokenizer must hold 'yes' and 'no' as whole tokens")
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        Qwen3VLForConditionalGeneration(config).save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
        transformer = Transformer(hf_dir, transformer_task="any-to-any")
        model = CrossEncoder(
            modules=[transformer, LogitScore(true_token_id=yes_id, false_token_id=no_id)],
            device="cpu",
        )
        model.save(str(path), create_model_card=False)
    return str(path)


def _bert(**config):
    """A tiny BERT config and a WordPiece tokenizer for it. WordPiece needs no training: whole words plus
    single characters (also as ## continuations) cover any lowercase ASCII input."""
    from transformers import BertConfig, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = [chr(code) for code in range(33, 127)]
    pieces = specials + sorted(set(_WORDS)) + characters + ["##" + c for c in characters]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    return tokenizer, BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        initializer_range=_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )


def build_tiny_cross_encoder(path: str | os.PathLike) -> str:
    """Build a tiny BERT ``ForSequenceClassification`` cross-encoder (one label) for ``CrossEncoder(path)``."""
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    path = _fresh_dir(path)
    tokenizer, config = _bert(num_labels=1)
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        BertForSequenceClassification(config).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        model = CrossEncoder(hf_dir, device="cpu", local_files_only=True)
        model.save(str(path), create_model_card=False)
    return str(path)


def build_tiny_clap(path: str | os.PathLike) -> str:
    """Build a tiny CLAP that ``SentenceTransformer(path)`` loads with modalities ``text`` and ``audio``.

    Audio is expected at 48 kHz (pass ``{"array": wave, "sampling_rate": 48000}``). Clips up to 2 s
    are repeat-padded to 2 s; longer clips are randomly cropped to 2 s, like the real model does past 10 s.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    path = _fresh_dir(path)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab, merges = _train_bpe(RobertaTokenizer(), vocab_size=2048, special_tokens=specials)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=64)
    # 16 mel bins at spec_size 64 keep the real freq_ratio of 4 (64 bins / 256). The model's time axis
    # is then 64 * 4 = 256 frames, so clips are capped at 2 s (201 frames) instead of the real 10 s:
    # shorter audio is repeat-padded, longer audio is randomly cropped ("rand_trunc", as in
    # laion/clap-htsat-unfused), which makes embeddings of clips over 2 s non-deterministic.
    feature_extractor = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=48_000,
        hop_length=480,
        max_length_s=2,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14_000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    processor = ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 66,
            "projection_dim": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "initializer_factor": _INIT_FACTOR,
        },
        audio_config={
            "spec_size": 64,
            "num_mel_bins": 16,
            "patch_size": 4,
            "patch_stride": [4, 4],
            "window_size": 4,
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "patch_embeds_hidden_size": 16,
            "hidden_size": 32,
            "projection_dim": 16,
            "num_hidden_layers": 2,
            "enable_fusion": False,
            "initializer_factor": _INIT_FACTOR,
        },
        projection_dim=16,
        initializer_factor=_INIT_FACTOR,
    )
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        ClapModel(config).save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
        model = SentenceTransformer(modules=[Transformer(hf_dir)], device="cpu")
        model.save(str(path), create_model_card=False)
    return str(path)


# ColBERT's own prefixes, and the punctuation skiplist PyLate and Stanford ColBERT apply to documents.
COLBERT_PROMPTS = {"query": "[Q] ", "document": "[D] "}


def build_tiny_colbert(path: str | os.PathLike) -> str:
    """Build a tiny ColBERT-style ``MultiVectorEncoder``, saved natively by sentence-transformers 6.

    Modules: Transformer (BERT; queries expanded to 12 positions with attention to the expansion
    tokens, documents cut at 48) -> Dense(32 -> 16, token level) -> MultiVectorMask(punctuation
    skiplist on documents) -> Normalize. Prompts ``[Q] `` / ``[D] ``.
    """
    import string

    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
    from transformers import BertModel

    path = _fresh_dir(path)
    tokenizer, config = _bert()
    with _seeded(), tempfile.TemporaryDirectory() as hf_dir:
        BertModel(config).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        transformer = Transformer(
            hf_dir, query_expansion={"strategy": "fixed", "attend": True, "length": 12}, document_length=48
        )
        dense = Dense(32, 16, bias=False, activation_function=torch.nn.Identity(), module_input_name="token_embeddings")
        model = MultiVectorEncoder(
            modules=[transformer, dense, MultiVectorMask(skiplist_words=list(string.punctuation)),
                     Normalize(module_input_name="token_embeddings")],
            prompts=dict(COLBERT_PROMPTS),
            device="cpu",
        )
        model.save(str(path), create_model_card=False)
    return str(path)


def build_tiny_colqwen2(path: str | os.PathLike) -> str:
    """Build a tiny ColQwen2 as the hub ships it (``vidore/colqwen2-v1.0-hf``): a transformers
    ``ColQwen2ForRetrieval`` and its processor, with no sentence-transformers files, which ST 6 loads as a
    ``MultiVectorEncoder`` (Transformer -> MultiVectorMask) for text queries and page images.

    The Qwen2-VL backbone is shrunk as the Qwen3-VL ones above; 14-pixel patches merged 2x2 give
    28-pixel cells, and the pixel budget caps an image at 128x128.
    """
    from transformers import ColQwen2Config, ColQwen2ForRetrieval, ColQwen2Processor

    path = _fresh_dir(path)
    tokenizer = _qwen_tokenizer()
    image_processor = _qwen_image_processor(14)
    processor = ColQwen2Processor(image_processor=image_processor, tokenizer=tokenizer)
    token = tokenizer.convert_tokens_to_ids
    vlm_config = {
        "model_type": "qwen2_vl",
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "initializer_range": _INIT_STD,
            # The three M-RoPE sections (time, height, width) cover head_dim / 2 = 8 rotary pairs.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 2, 4]},
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": _INIT_STD,
        },
        "image_token_id": token("<|image_pad|>"),
        "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
    }
    config = ColQwen2Config(vlm_config=vlm_config, embedding_dim=16, initializer_range=_INIT_STD)
    with _seeded():
        ColQwen2ForRetrieval(config).save_pretrained(str(path))
        processor.save_pretrained(str(path))
    return str(path)


_BUILDERS: dict[str, Callable[[str | os.PathLike], str]] = {
    "clip": build_tiny_clip,
    "qwen3vl_embedder": build_tiny_qwen3vl_embedder,
    "qwen3vl_reranker": build_tiny_qwen3vl_reranker,
    "cross_encoder": build_tiny_cross_encoder,
    "clap": build_tiny_clap,
    "colbert": build_tiny_colbert,
    "colqwen2": build_tiny_colqwen2,
}
TINY_MODEL_KINDS = tuple(_BUILDERS)


def tiny_model(kind: str, root: str | os.PathLike) -> str:
    """Return ``root/kind``, building that tiny model first if it is not there yet.

    The model is built in a hidden sibling directory and renamed into place, so a directory at
    ``root/kind`` is always complete. Concurrent callers may both build; the first rename wins and the
    loser discards its copy.
    """
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise ValueError(f"Unknown tiny model kind {kind!r}; expected one of {TINY_MODEL_KINDS}") from None
    root = Path(root)
    target = root / kind
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    # mkdtemp creates 0700; the cache is meant to be shared with other processes and users.
    staging.chmod(0o755)
    try:
        builder(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build into place first (the target is now a non-empty dir).
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
