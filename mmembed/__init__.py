"""mmembed: corpus-scale multimodal embedding and reranking on Ray Data.

The model semantics (prompts, chat templates, pooling, scores) are sentence-transformers';
mmembed supplies the streaming plumbing around them.
"""

__version__ = "0.1.0"
